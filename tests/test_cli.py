"""The ``sharedllm-ops`` command: ``info`` and ``ops --quick`` run in-process and report sane results."""

import json
import re
import subprocess
import sys

import pytest

from sharedllm_ops.cli import main

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


def test_demo_quick_agrees_with_the_reference(capsys):
    assert main(["ops", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(OPS)]
    for op in OPS:
        assert any(row.startswith(op) for row in rows), f"{op} missing from the demo table:\n{out}"
    # every row's error column: a number like 2.38e-07
    errors = [float(m.group(0)) for row in rows for m in [re.search(r"\s(\d\.\d\de[+-]\d\d)\b", row)] if m]
    assert len(errors) == len(rows) >= len(OPS)
    assert max(errors) < 1e-4, out
    assert "agree with the reference" in out


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["ops", "--dtype", "float64"])
    assert exc.value.code == 2


def test_python_dash_m_runs_the_cli():
    command = [sys.executable, "-m", "sharedllm_ops", "info"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cross_inject_attention" in result.stdout
