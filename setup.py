"""Build of sharedllm_ops and its one extension, sharedllm_ops._C.

Knobs (environment variables):
  SHAREDLLM_OPS_CPU_ONLY=1   build the CPU kernels only, even where torch has CUDA and nvcc exists
  SHAREDLLM_OPS_SKIP_EXT=1   no extension at all (the package falls back to its Python backends)
  CUDA_HOME                  CUDA toolkit to use (e.g. /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST       archs to compile for, e.g. "8.0;9.0+PTX" (default: those of the local GPUs,
                             or 8.0;8.6;8.9;9.0+PTX where none is visible)
  MAX_JOBS                   parallel compile jobs (ninja)
  NVCC_THREADS               nvcc --threads (default 2)
"""

import datetime
import glob
import json
import os
import re
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET_VERSION = "0x020A000000000000"  # torch 2.10: (major << 56) | (minor << 48)
PY_LIMITED_API = "0x030A0000"  # CPython 3.10
# the archs of a wheel when none are given and no GPU is visible: Ampere to Hopper, PTX for newer GPUs
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _base_version() -> str:
    text = open(os.path.join(ROOT, "sharedllm_ops", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"  # an sdist or a tree without git


def _with_build_meta(build_ext_class, meta: dict):
    """build_ext that also writes sharedllm_ops/_build_meta.json beside the extension it builds (in
    the tree for --inplace, else into the wheel's build folder): what the binary is built for,
    readable even when it fails to load (the import warning and `python -m sharedllm_ops info`)."""

    class BuildExtWithMeta(build_ext_class):
        def run(self):
            super().run()
            folder = os.path.join(ROOT if self.inplace else self.build_lib, "sharedllm_ops")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_meta.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.write("\n")

    return BuildExtWithMeta


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    """(ext_modules, cmdclass, local version tag)."""
    if _flag("SHAREDLLM_OPS_SKIP_EXT"):
        return [], {}, ""
    import torch
    from torch.utils import cpp_extension

    with_cuda = (
        not _flag("SHAREDLLM_OPS_CPU_ONLY")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = [s for s in rel("csrc/torch/*.cpp") if not s.endswith("_cuda.cpp")] + rel("csrc/cpu/*.cpp")
    torch_version = torch.__version__.split("+")[0]
    macros = [
        ("SHAREDLLM_TORCH_VERSION", f'"{torch_version}"'),
        # the stable ABI of torch 2.10: the binary loads in every torch from 2.10 on
        ("TORCH_TARGET_VERSION", TORCH_TARGET_VERSION),
        # the limited C API of CPython 3.10: one binary for every CPython from 3.10 on
        ("Py_LIMITED_API", PY_LIMITED_API),
    ]
    # -Wno-psabi: the 32-byte vector helpers of cpu_vec.h are always inlined, never passed by ABI
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    cxx_flags += ["-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    # hidden by default, like the stable ABI's own types: the module exports PyInit__C only
    cxx_flags += ["-fvisibility=hidden"]
    link_flags = []
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        sources += rel("csrc/torch/*_cuda.cpp") + rel("csrc/cuda/*.cu")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS  # no GPU to take the archs from
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        # USE_CUDA: declares the CUDA entries of torch's stable C shim (current stream)
        macros += [("SHAREDLLM_WITH_CUDA", None), ("SHAREDLLM_CUDA_ARCHS", f'"{archs}"'), ("USE_CUDA", None)]
        ext = cpp_extension.CUDAExtension(
            "sharedllm_ops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "sharedllm_ops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    # the local version tag names what the wheel needs besides torch >= 2.10: +cu130, or +cpu
    local = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    meta = {
        "version": f"{_base_version()}+{local}",
        "built_with_torch": torch_version,
        "min_torch": "2.10",
        "python_abi": "cp310-abi3",
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else None,
        "git_revision": _git_revision(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    print(f"sharedllm_ops: building {'CUDA' if with_cuda else 'CPU-only'} extension from {len(sources)} sources")
    build_ext = _with_build_meta(cpp_extension.BuildExtension.with_options(use_ninja=True), meta)
    return [ext], {"build_ext": build_ext}, local


ext_modules, cmdclass, local_tag = _extensions()

setup(
    version=_base_version() + (f"+{local_tag}" if local_tag else ""),
    packages=find_packages(include=["sharedllm_ops", "sharedllm_ops.*"]),
    # the trained injectors shipped with the package (config + safetensors)
    # (sharedllm_ops/_build_meta.json is written by build_ext, beside the extension)
    package_data={"sharedllm_ops.model": ["injectors/*/*.json", "injectors/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # abi3 wheels: tagged cp310-abi3, installable on every CPython from 3.10 on
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
