"""The validation table (``sharedllm_ops.model.validation``, ``sharedllm-ops validate``)."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from sharedllm_ops.cli.parser import build_parser  # noqa: E402
from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402
from sharedllm_ops.model.text import full_perplexity, window_perplexity  # noqa: E402
from sharedllm_ops.model.validation import (  # noqa: E402
    ValidationRow,
    format_validation,
    summary,
    validation_row,
    validation_rows,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ByteTokenizer:
    """Bytes as token ids in the tiny model's vocabulary."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + b % 120 for b in text.encode("utf-8")]}


def wrapped():
    cfg = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4, positions="distance",
                          cross_init="random", drop_node_sinks=True)
    return SharedLLMForCausalLM.from_base(tiny_model("llama", seed=21), cfg)


def test_row_holds_each_baseline_of_the_same_text():
    model = wrapped()
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(22))
    row = validation_row(model, "random", ids, window=48, last=16)
    base = model.base_model
    with torch.no_grad(), model.injecting(None):
        assert row.window == pytest.approx(window_perplexity(base, ids, 48, 16), rel=1e-6)
        assert row.full == pytest.approx(full_perplexity(base, ids, 16), rel=1e-6)
        # 252 context tokens -> 8 chunks of 32 (the last 28) -> nodes pooled to at most 4 rows each
        assert 48 < row.same_kv_tokens < 300
        assert row.same_kv == pytest.approx(window_perplexity(base, ids, row.same_kv_tokens, 16), rel=1e-6)
    assert row.sharedllm != row.window  # the (random) cross blocks read the context
    model.unwrap()


def test_gap_is_on_a_log_scale_and_summary_counts_wins():
    e = math.e
    rows = [ValidationRow("a", e**2, e**1.2, 100, e**1, e**0), ValidationRow("b", e**1, e**0.5, 100, e**1.5, e**0.5)]
    assert rows[0].gap_recovered == pytest.approx(0.5)
    assert rows[1].gap_recovered == pytest.approx(-1.0)
    s = summary(rows)
    # geometric means: window e^1.5, SharedLLM e^1.25, full e^0.25 -> (1.5 - 1.25) / (1.5 - 0.25)
    assert s["gap_recovered"] == pytest.approx(0.2)
    assert (s["beats_window"], s["beats_same_kv"], s["texts"]) == (1, 1, 2)
    table = format_validation(rows)
    assert "| **geometric mean** |" in table and "beats the window on 1/2 texts" in table


def test_validation_rows_read_standard_library_modules():
    model = wrapped()
    names = []
    rows = validation_rows(model, ByteTokenizer(), ["functools.py", "inspect.py"], window=48, last=16, max_tokens=200,
                           full=False, progress=names.append)
    model.unwrap()
    assert names == ["functools.py", "inspect.py"] and [r.text for r in rows] == names
    assert all(math.isnan(r.full) and r.window > 0 and r.sharedllm > 0 for r in rows)


def test_validate_command_options():
    args = build_parser().parse_args(["validate", "--injector", "x", "--modules", "eval", "selection", "--window", "256"])
    assert args.modules == ["eval", "selection"] and args.window == 256
    args = build_parser().parse_args(["validate", "--window", "64", "--last", "64"])
    with pytest.raises(SystemExit, match="--last"):
        args.run(args)


@pytest.mark.parametrize("config, message", [
    ("{bad", "--config is not JSON"),
    ("[1]", "--config must be a JSON object"),
])
def test_validate_rejects_a_bad_config_before_loading_a_model(config, message):
    args = build_parser().parse_args(["validate", "--model", "/nonexistent", "--injector", "none", "--config", config])
    with pytest.raises(SystemExit, match=message):
        args.run(args)
