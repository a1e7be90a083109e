"""The ``sharedllm-ops`` command: ``info`` and ``ops --quick`` run in-process and report sane results."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import requires_smollm2

import sharedllm_ops.cli as cli
from sharedllm_ops.cli import main
from sharedllm_ops.cli.kernel_check import run_kernel_check
from sharedllm_ops.dtypes import DTYPES
from sharedllm_ops.model.evaluate import TRAINING_FREE_ROW

OPS = ("chunk_pool", "tree_topk", "cross_inject_attention", "merge_attention")


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sharedllm_ops 0.1.0" in out
    for word in ("reference", "cpp", "cuda", "triton", *OPS[:3]):
        assert word in out


def test_info_json_is_build_info(capsys):
    import sharedllm_ops

    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(sharedllm_ops.build_info()))


def test_ops_quick_agrees_with_the_reference(capsys):
    assert main(["ops", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(OPS)]
    for op in OPS:
        assert any(row.startswith(op) for row in rows), f"{op} missing from the kernel check's table:\n{out}"
    # every row's error column: a number like 2.38e-07
    errors = [float(m.group(0)) for row in rows for m in [re.search(r"\s(\d\.\d\de[+-]\d\d)\b", row)] if m]
    assert len(errors) == len(rows) >= len(OPS)
    assert max(errors) < 1e-4, out
    assert "agree with the reference" in out


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["ops", "--dtype", "float64"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_ops_on_cuda_without_a_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ops", "--device", "cuda"])
    assert exc.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    command = [sys.executable, "-m", "sharedllm_ops", "info"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cross_inject_attention" in result.stdout


def test_info_does_not_load_transformers():
    """The model commands' bodies (and transformers, seconds to import) load only when one runs."""
    code = "import sys; from sharedllm_ops.cli import main; main(['info']); print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


def test_old_names_of_the_cli_module_warn_and_point_to_their_new_home():
    with pytest.warns(DeprecationWarning, match="sharedllm_ops.dtypes.DTYPES"):
        assert cli.DTYPES is DTYPES
    with pytest.warns(DeprecationWarning, match="run_kernel_check"):
        assert cli.run_demo is run_kernel_check
    with pytest.raises(AttributeError, match="no_such_name"):
        cli.no_such_name  # noqa: B018


def _perplexity_rows(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].replace(".", "", 1).isdigit():
            rows[cells[0]] = float(cells[1])
    return rows


@requires_smollm2
def test_model_demo_prints_sizes_stages_table_and_continuation(capsys):
    """The real SmolLM2 on a short slice of inspect.py (the full demo takes minutes)."""
    assert main(["demo", "--max-tokens", "640", "--window", "256", "--last", "64", "--chunk-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "384 tokens in 1 chunks" in out  # 640 - 256 tokens of context; the trained injector has chunks of 1024
    for stage in ("retrieve", "encode", "pool", "inject", "decode"):
        assert f"{stage} " in out
    rows = _perplexity_rows(out)
    names = " / ".join(rows)
    assert any(n.startswith("window 256 only") for n in rows), names
    assert any("uncompressed" in n for n in rows) and TRAINING_FREE_ROW in rows, names
    assert any(n.startswith("full attention (640 tokens)") for n in rows), names
    assert "SharedLLM (trained, compressed)" in rows, names  # the injector shipped for SmolLM2
    assert all(1.0 < ppl < 1000.0 for ppl in rows.values()), rows
    assert "greedy continuation" in out


@requires_smollm2
def test_eval_ppl_on_a_text_file(tmp_path, capsys):
    import inspect

    text = tmp_path / "sample.py"
    text.write_text(inspect.getsource(inspect))
    assert main(["eval-ppl", "--text", str(text), "--max-tokens", "400", "--window", "200", "--last", "50",
                 "--chunk-size", "64"]) == 0
    rows = _perplexity_rows(capsys.readouterr().out)
    assert len(rows) == 4 and all(1.0 < ppl < 1000.0 for ppl in rows.values()), rows


def test_model_commands_reject_bad_windows():
    with pytest.raises(SystemExit, match="--last"):
        main(["demo", "--window", "64", "--last", "64"])
