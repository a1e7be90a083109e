"""``bench/gpu_check.sh`` fits one device call: its dry run passes here, every stage reports, the
stage budget adds up to at most 8 minutes, and it leaves at most six result files (issue 17)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ("environment", "cuda", "triton", "sanitizer", "bench", "compile")


def budgets() -> dict:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^STAGE_BUDGET_(\w+)=(\d+)", SCRIPT.read_text(), re.M)}


def test_stage_budget_fits_one_call():
    stages = budgets()
    assert tuple(stages) == STAGES
    assert sum(stages.values()) <= 8 * 60
    calls = re.findall(r"^stage (\w+) ", SCRIPT.read_text(), re.M)
    assert tuple(calls) == STAGES, "every stage runs, in the order of its budget"


@pytest.mark.skipif(sys.platform != "linux", reason="the device machine runs Linux; the script needs GNU timeout")
def test_dry_run_runs_every_stage_and_skips_what_needs_a_gpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in STAGES:
        line = next((x for x in lines if x.startswith(f"stage {name}: ")), None)
        assert line is not None, f"stage {name} printed no summary line:\n{done.stdout}"
        assert line.startswith(f"stage {name}: ok"), line
    assert any(x.startswith("total: ") and x.endswith("(dry run)") for x in lines)
    assert "compute-sanitizer skipped (dry run)" in done.stdout and "0 failures" in done.stdout
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 6, files
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [x.split(":")[0] for x in summary[:6]] == [f"stage {s}" for s in STAGES]


def test_a_failing_stage_does_not_stop_the_others(tmp_path):
    # a Python that cannot import torch makes every test stage fail; each still reports, and the run ends
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(tmp_path / "no-python"))
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    reported = [x for x in done.stdout.splitlines() if x.startswith("stage ")]
    assert len(reported) == len(STAGES)
    assert sum("FAILED" in x for x in reported) >= 4, reported


def test_autotuning_switch(monkeypatch):
    from sharedllm_ops.triton import _runtime

    monkeypatch.setenv("SHAREDLLM_TRITON_AUTOTUNE", "0")
    assert not _runtime.autotuning()
    monkeypatch.setenv("SHAREDLLM_TRITON_AUTOTUNE", "1")
    assert _runtime.autotuning()
    monkeypatch.delenv("SHAREDLLM_TRITON_AUTOTUNE")
    assert _runtime.autotuning()


@pytest.mark.parametrize("tune,configs", [("1", 12), ("0", 1)])
def test_attention_kernels_tune_twelve_configs_or_one(monkeypatch, tune, configs):
    triton_attention = pytest.importorskip("sharedllm_ops.triton.cross_inject_attention")
    monkeypatch.setenv("SHAREDLLM_TRITON_AUTOTUNE", tune)
    monkeypatch.setattr(triton_attention, "interpreting", lambda: False)
    tuned = triton_attention._autotuned(triton_attention._attn_fwd_kernel, "BLOCK_N")
    assert len(tuned.configs) == configs
