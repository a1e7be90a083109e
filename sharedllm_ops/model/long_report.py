"""The report of ``sharedllm-ops eval-long``: markdown tables, a JSON file with every number and the
settings, and PNG plots (matplotlib, the optional ``[plot]`` extra) of what ``long_context.py``
and ``passkey.py`` measured."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

from .long_context import CurveRow, SweepPlan
from .passkey import PasskeyResult

__all__ = ["PLOT_HINT", "accuracy_grid", "format_passkey", "format_perplexity", "plot_passkey", "plot_perplexity",
           "write_report"]

PLOT_HINT = "pip install 'sharedllm_ops[plot]' (matplotlib) to get the PNG plots"
NOT_APPLICABLE = "—"  # a row that does not apply here, e.g. full attention beyond the model's positions


def token_count(n: int) -> str:
    """``8192`` -> ``"8K"``; other counts as they are."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def format_perplexity(rows: list[CurveRow], plan: SweepPlan) -> str:
    """One markdown table per decoder window: a row per method, a column per context length."""
    parts = []
    for w in plan.windows:
        header = "| row | " + " | ".join(f"C={token_count(c)}" for c in plan.contexts) + " |"
        lines = [f"Perplexity of tokens {plan.scored.start}..{plan.scored.stop - 1} (the last {plan.last}), "
                 f"decoder window {w}, C tokens of context before it:", "", header,
                 "|---" * (len(plan.contexts) + 1) + "|"]
        for row in (r for r in rows if r.window == w):
            cells = []
            for ppl, kv in zip(row.perplexity, row.kv_tokens):
                cell = NOT_APPLICABLE if ppl is None else f"{ppl:.3f}"
                if row.kind == "same_kv" and ppl is not None:
                    cell += f" ({kv})"  # the plain window's length
                cells.append(cell)
            lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    note = ("Same-KV rows: a plain window of (window + SharedLLM's compressed rows) tokens, length in brackets. "
            f"{NOT_APPLICABLE}: beyond the base model's max_position_embeddings. At C=0 every row is the window alone.")
    return "\n\n".join(parts + [note])


def accuracy_grid(results: list[PasskeyResult], method: str, window: int, lengths, depths) -> list[list]:
    """``[len(lengths)][len(depths)]`` accuracies of ``method`` (None where it does not apply)."""
    grid = []
    for n in lengths:
        line = []
        for d in depths:
            marks = [r.correct for r in results if (r.method, r.window, r.length, r.depth) == (method, window, n, d)]
            line.append(None if not marks or None in marks else sum(marks) / len(marks))
        grid.append(line)
    return grid


def _methods(results: list[PasskeyResult], window: int) -> list[str]:
    return list(dict.fromkeys(r.method for r in results if r.window == window))


def format_passkey(results: list[PasskeyResult], windows, lengths, depths) -> str:
    """One markdown table per decoder window: correct answers per method and length, by depth."""
    parts = []
    for w in windows:
        lines = [f"Passkey retrieval, decoder window {w} (the question ends it; the key is in the context before "
                 "it, at the given depth): correct / asked", "",
                 "| method | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | all |",
                 "|---|---" + "|---" * (len(depths) + 1) + "|"]
        for method in _methods(results, w):
            for n in lengths:
                cells, total = [], [0, 0]
                for d in depths:
                    marks = [r.correct for r in results if (r.method, r.window, r.length, r.depth) == (method, w, n, d)]
                    if not marks or None in marks:
                        cells.append(NOT_APPLICABLE)
                        continue
                    cells.append(f"{sum(marks)}/{len(marks)}")
                    total[0] += sum(marks)
                    total[1] += len(marks)
                overall = f"{total[0]}/{total[1]}" if total[1] else NOT_APPLICABLE
                lines.append(f"| {method} | {token_count(n)} | " + " | ".join(cells) + f" | {overall} |")
        parts.append("\n".join(lines))
    note = (f"{NOT_APPLICABLE}: full attention beyond the base model's max_position_embeddings, or a length too short "
            "to hold the introduction and the key before that window.")
    return "\n\n".join(parts + [note])


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(rows: list[CurveRow], plan: SweepPlan, path: Path) -> bool:
    """Perplexity against context length (log2 axis), a panel per window and a line per row; the window
    alone is the dashed level every curve starts from. False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    contexts = [c for c in plan.contexts if c > 0]
    fig, axes = plt.subplots(1, len(plan.windows), figsize=(6.5 * len(plan.windows), 4.5), squeeze=False)
    for ax, w in zip(axes[0], plan.windows):
        for row in (r for r in rows if r.window == w):
            if row.kind == "window":
                ax.axhline(row.perplexity[0], color="gray", linestyle="--", label=row.name)
                continue
            points = [(c, p) for c, p in zip(plan.contexts, row.perplexity) if c > 0 and p is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=row.name)
        if contexts:
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [token_count(c) for c in contexts])
        ax.set_xlabel("context tokens before the window")
        ax.set_ylabel(f"perplexity of the last {plan.last} tokens")
        ax.set_title(f"decoder window {w}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_passkey(results: list[PasskeyResult], windows, lengths, depths, path: Path) -> bool:
    """Accuracy heatmaps, lengths x depths, a panel per (window, method); blank where a method does
    not apply. False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    panels = [(w, m) for w in windows for m in _methods(results, w)]
    columns = max(1, len(panels) // len(windows))
    fig, axes = plt.subplots(len(windows), columns, figsize=(1.0 + 0.9 * len(depths) * columns + 1.2 * columns,
                                                           0.6 * len(lengths) * len(windows) + 1.5 * len(windows)),
                             squeeze=False)
    for ax, (w, method) in zip(axes.flat, panels):
        grid = accuracy_grid(results, method, w, lengths, depths)
        values = [[math.nan if a is None else a for a in line] for line in grid]
        ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, a in enumerate(line):
                ax.text(j, i, NOT_APPLICABLE if a is None else f"{a:.0%}", ha="center", va="center", fontsize=8,
                        color="black" if a is None or 0.25 < a < 0.75 else "white")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [token_count(n) for n in lengths])
        ax.set_xlabel("depth of the key in the context")
        ax.set_ylabel("prompt tokens")
        ax.set_title(method if method.startswith("window") else f"{method}, window {w}", fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(output: Path, settings: dict, plan: SweepPlan | None, rows: list[CurveRow] | None,
                 passkey: dict | None) -> tuple[str, list[Path]]:
    """Writes ``results.md``, ``results.json`` and the plots (where matplotlib is installed) under
    ``output``. ``passkey``: ``{"results": [...], "windows", "lengths", "depths"}`` or None.

    Returns the markdown and the files written."""
    output.mkdir(parents=True, exist_ok=True)
    sections, files, data = [], [], {"settings": settings}
    if rows is not None:
        sections.append(format_perplexity(rows, plan))
        data["perplexity"] = {"contexts": list(plan.contexts), "windows": list(plan.windows), "last": plan.last,
                              "scored_tokens": [plan.scored.start, plan.scored.stop],
                              "rows": [dataclasses.asdict(r) for r in rows]}
        if plot_perplexity(rows, plan, output / "perplexity_vs_context.png"):
            files.append(output / "perplexity_vs_context.png")
    if passkey is not None:
        shape = (passkey["windows"], passkey["lengths"], passkey["depths"])
        sections.append(format_passkey(passkey["results"], *shape))
        data["passkey"] = {"windows": list(shape[0]), "lengths": list(shape[1]), "depths": list(shape[2]),
                           "results": [dataclasses.asdict(r) for r in passkey["results"]],
                           "accuracy": {f"{m} | window {w}": accuracy_grid(passkey["results"], m, w, *shape[1:])
                                        for w in shape[0] for m in _methods(passkey["results"], w)}}
        if plot_passkey(passkey["results"], *shape, output / "passkey.png"):
            files.append(output / "passkey.png")
    markdown = "\n\n".join(sections) + "\n"
    (output / "results.md").write_text(markdown)
    (output / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return markdown, [output / "results.md", output / "results.json", *files]
