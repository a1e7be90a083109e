"""The validation table of a trained injector (docs/DESIGN.md section 7): is the compressed context worth its memory?

Per text: the first ``max_tokens`` tokens, the last ``last`` of them scored, a decoder window of
``window`` tokens and the rest as context. Rows, all from one run:

* **window**: the base model on the decoder window alone;
* **same KV**: a plain window holding as many tokens as SharedLLM holds key/value rows (the
  window plus the compressed context's rows), nothing compressed;
* **SharedLLM**: the injector, the window's tokens before the scored ones as the retrieval query;
* **full**: the base model on every token, where they fit its position window.

The gap recovered is ``(log window - log SharedLLM) / (log window - log full)``; over several texts
it is that ratio of the geometric means (the mean log-perplexities), as issue 16 measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .evaluate import sharedllm_perplexity
from .text import full_perplexity, module_text, tokenize_text, window_perplexity


@dataclass
class ValidationRow:
    """One text's perplexities (``full`` is NaN where the text does not fit the base model)."""

    text: str
    window: float
    same_kv: float
    same_kv_tokens: int
    sharedllm: float
    full: float

    @property
    def gap_recovered(self) -> float:
        return _gap(self.window, self.sharedllm, self.full)


def _gap(window: float, sharedllm: float, full: float) -> float:
    span = math.log(window) - math.log(full)
    return (math.log(window) - math.log(sharedllm)) / span if span > 0 else float("nan")


@torch.no_grad()
def validation_row(model, name: str, ids: torch.Tensor, window: int = 512, last: int = 256,
                   full: bool = True) -> ValidationRow:
    """The rows of the module docstring for one text's token ids ``[N]`` (``model``: a wrapped model;
    ``full=False`` leaves full attention out: NaN)."""
    base = model.base_model
    sharedllm, stats, _ = sharedllm_perplexity(model, ids, window, last)
    budget = window + int(stats["compressed_tokens"])
    with model.injecting(None):
        alone = window_perplexity(base, ids, window, last)
        same_kv = window_perplexity(base, ids, min(budget, ids.numel()), last)
        fits = ids.numel() <= (getattr(base.config, "max_position_embeddings", None) or ids.numel())
        everything = full_perplexity(base, ids, last) if full and fits else float("nan")
    return ValidationRow(name, alone, same_kv, budget, sharedllm, everything)


def validation_rows(model, tokenizer, modules, window: int = 512, last: int = 256, max_tokens: int = 8192,
                    full: bool = True, progress=None) -> list[ValidationRow]:
    """:func:`validation_row` for each standard-library module of ``modules``; ``progress(name)`` before each."""
    rows = []
    for name in modules:
        if progress is not None:
            progress(name)
        ids = tokenize_text(tokenizer, module_text(name), max_tokens)
        rows.append(validation_row(model, name, ids, window, last, full))
    return rows


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows: list[ValidationRow]) -> dict:
    """Geometric means, the gap recovered by them, and on how many texts SharedLLM beats each baseline."""
    means = {k: geometric_mean(getattr(r, k) for r in rows) for k in ("window", "same_kv", "sharedllm", "full")}
    return {
        "texts": len(rows),
        "geomean": means,
        "gap_recovered": _gap(means["window"], means["sharedllm"], means["full"]),
        "beats_window": sum(r.sharedllm < r.window for r in rows),
        "beats_same_kv": sum(r.sharedllm < r.same_kv for r in rows),
    }


def _number(x: float, spec: str) -> str:
    return "—" if math.isnan(x) else format(x, spec)


def format_validation(rows: list[ValidationRow]) -> str:
    """Markdown: a row per text, the geometric means, and the three counts the issue asks for
    (``—`` where full attention was left out)."""
    lines = ["| text | window | same KV (tokens) | SharedLLM | full | gap recovered |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.text} | {r.window:.3f} | {r.same_kv:.3f} ({r.same_kv_tokens}) | {r.sharedllm:.3f} | "
                     f"{_number(r.full, '.3f')} | {_number(r.gap_recovered, '.0%')} |")
    s = summary(rows)
    g = s["geomean"]
    lines.append(f"| **geometric mean** | {g['window']:.3f} | {g['same_kv']:.3f} | {g['sharedllm']:.3f} | "
                 f"{_number(g['full'], '.3f')} | {_number(s['gap_recovered'], '.0%')} |")
    n = s["texts"]
    lines.append("")
    gap = "" if math.isnan(s["gap_recovered"]) else (
        f"; it recovers {s['gap_recovered']:.0%} of the window-to-full gap (geometric means, log scale)")
    lines.append(f"SharedLLM beats the window on {s['beats_window']}/{n} texts and the same-KV window on "
                 f"{s['beats_same_kv']}/{n}{gap}.")
    return "\n".join(lines)


__all__ = ["ValidationRow", "format_validation", "geometric_mean", "summary", "validation_row", "validation_rows"]
