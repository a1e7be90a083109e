"""Smoke test of an installed wheel (run from outside the repo by .ci/check_wheels.sh): it is the
installed package, its extension loads in this torch, and every op runs on CPU tensors and matches
the reference."""

import os
import sys
import warnings

warnings.filterwarnings("error", message="sharedllm_ops")  # a load or version warning fails the check

import torch  # noqa: E402

import sharedllm_ops as so  # noqa: E402
from sharedllm_ops.workloads import cu_seqlens, rotary_tables  # noqa: E402

assert "site-packages" in so.__file__, f"not the installed wheel: {so.__file__}"
info = so.build_info()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, sharedllm_ops {info['build']['version']}")
print(f"built with torch {info['build']['built_with_torch']}, CUDA {info['build']['cuda']}, "
      f"archs {info['build']['cuda_archs']}, git {info['build']['git_revision']}")
assert info["extension_loaded"], info["extension_error"]
here = os.path.dirname(os.path.realpath(so.__file__))
assert so._C.__file__.endswith(".abi3.so") and os.path.dirname(os.path.realpath(so._C.__file__)) == here, so._C.__file__

x = torch.randn(40, 2, 16)
cu = cu_seqlens([25, 0, 15])
torch.testing.assert_close(so.chunk_pool(x, cu, 4, backend="cpp"), so.chunk_pool(x, cu, 4, backend="reference"))
query, emb = torch.randn(2, 32), torch.randn(2, 3, 14, 32)
ids, scores = so.tree_topk(query, emb, 3, backend="cpp")
ref_ids, ref_scores = so.tree_topk(query, emb, 3, backend="reference")
assert torch.equal(ids, ref_ids)
torch.testing.assert_close(scores, ref_scores)
q, k, v = torch.randn(30, 4, 64), torch.randn(50, 2, 64), torch.randn(50, 2, 64)
cos, sin = rotary_tables(128, 64)
rot = dict(q_positions=torch.randint(0, 128, (30,), dtype=torch.int32),
           k_positions=torch.randint(0, 128, (50,), dtype=torch.int32), rotary_cos=cos, rotary_sin=sin)
out = so.cross_inject_attention(q, k, v, cu_seqlens([10, 20]), cu_seqlens([5, 45]), backend="cpp", **rot)
ref = so.cross_inject_attention(q, k, v, cu_seqlens([10, 20]), cu_seqlens([5, 45]), backend="reference", **rot)
torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
print("wheel smoke test passed")
