"""Perplexity against context length, the first half of ``sharedllm-ops eval-long`` (docs/DESIGN.md section 7).

The scored tokens never move. Of a text's token ids, take the first ``T = max(contexts) + max(windows)``;
the scored segment is their last ``last`` tokens. For a decoder window ``W`` the decoder reads
``ids[T - W : T]`` and, for each context length ``C``, the ``C`` tokens just before the window,
``ids[T - W - C : T - W]``, are the context. Only ``C`` changes along a curve, so a falling curve
means the far context helps. Rows, one value per ``C``:

* **window alone**: the base model on the decoder window (the same at every ``C``);
* **SharedLLM** (one row per injector or training-free config): the context compressed, the
  retrieval query being the window's tokens *before* the scored segment (so the choice of context
  never depends on the tokens it is scored on);
* **same KV budget**: a plain window as long as SharedLLM's decoder window plus its compressed rows
  (``W + stats["compressed_tokens"]``, at most ``W + C``): what the same key/value memory buys
  without compression;
* **full attention**: the base model on ``C + W`` tokens, where they fit its ``max_position_embeddings``.

At ``C = 0`` every row is the window alone, by definition (nothing is computed twice). A row that
does not apply at some ``C`` (a window longer than the base model's) holds ``None``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import SharedLLMConfig
from .modeling import SharedLLMForCausalLM
from .text import full_perplexity, window_perplexity

__all__ = ["CurveRow", "SweepPlan", "context_sweep", "max_positions", "sharedllm_window_perplexity",
           "sweep_steps", "wrapped"]


@dataclass(frozen=True)
class SweepPlan:
    """The context lengths, decoder windows and scored tokens of one perplexity-vs-context sweep."""

    contexts: tuple[int, ...]
    windows: tuple[int, ...]
    last: int

    def __post_init__(self):
        contexts, windows = tuple(self.contexts), tuple(self.windows)
        object.__setattr__(self, "contexts", contexts)
        object.__setattr__(self, "windows", windows)
        if not contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in contexts):
            raise ValueError(f"--contexts must be integers >= 0, got {list(contexts)}")
        if any(a >= b for a, b in zip(contexts, contexts[1:])):
            raise ValueError(f"--contexts must be strictly increasing, got {list(contexts)}")
        if not windows or len(set(windows)) != len(windows):
            raise ValueError(f"--window needs distinct values, got {list(windows)}")
        if isinstance(self.last, bool) or not isinstance(self.last, int) or not 1 <= self.last < min(windows):
            raise ValueError(f"need 1 <= --last < every --window (a query token before the scored ones), "
                             f"got --last {self.last}, --window {list(windows)}")

    @property
    def total_tokens(self) -> int:
        """``T``: the scored segment ends here (ids past it are never read)."""
        return max(self.contexts) + max(self.windows)

    @property
    def scored(self) -> slice:
        """The scored tokens' slice of the text's ids: the same for every row, window and context."""
        return slice(self.total_tokens - self.last, self.total_tokens)

    def split(self, ids: torch.Tensor, window: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context ids [context], decoder ids [window])`` of ``ids [N >= T]``: views, the context
        ending where the decoder window starts and the window ending at ``T``."""
        end = self.total_tokens
        if ids.dim() != 1 or ids.numel() < end:
            raise ValueError(f"the text has {ids.numel()} tokens, but --contexts up to {max(self.contexts)} with "
                             f"--window {max(self.windows)} need {end}: pass a longer --text or smaller --contexts")
        start = end - window
        return ids[start - context:start], ids[start:end]


@dataclass
class CurveRow:
    """One line of the perplexity curve: a value per context length (``None`` where it does not apply).

    ``kv_tokens``: the key/value rows per layer the scored tokens can attend to (window plus context rows)."""

    name: str
    kind: str  # "window", "sharedllm", "same_kv" or "full"
    window: int
    perplexity: list = field(default_factory=list)
    kv_tokens: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    stats: list = field(default_factory=list)  # SharedLLM rows: the compressed context's stats per context

    def add(self, perplexity, kv_tokens, seconds=0.0, stats=None) -> None:
        self.perplexity.append(perplexity)
        self.kv_tokens.append(kv_tokens)
        self.seconds.append(seconds)
        self.stats.append(stats)


def max_positions(base) -> int | None:
    """The base model's position window (``max_position_embeddings``), None if it states none."""
    return getattr(base.config, "max_position_embeddings", None)


@contextmanager
def wrapped(base, config):
    """``SharedLLMForCausalLM`` around ``base`` in eval mode, unwrapped on exit. ``config``: a
    SharedLLMConfig (training-free), the folder of a trained injector (``save_pretrained``), or
    ``(folder, overrides)``: that injector with these SharedLLMConfig fields over its own."""
    if isinstance(config, SharedLLMConfig):
        model = SharedLLMForCausalLM.from_base(base, config)
    else:
        folder, overrides = config if isinstance(config, tuple) else (config, {})
        model = SharedLLMForCausalLM.from_pretrained(folder, base, **overrides)
    try:
        yield model
    finally:
        model.unwrap()


@torch.no_grad()
def sharedllm_window_perplexity(model: SharedLLMForCausalLM, context: torch.Tensor, decoder: torch.Tensor,
                                last: int) -> tuple[float, dict]:
    """Perplexity of the last ``last`` tokens of ``decoder [W]`` with ``context [C >= 1]`` compressed.

    The retrieval query is ``decoder[:-last]``: it ends before the first scored token. Returns the
    perplexity and the compressed context's stats."""
    device = model.device
    decoder = decoder.to(device)[None]
    ctx = model.compress_context(context.to(device)[None], None, query_input_ids=decoder[:, :-last])
    logits = model(decoder, compressed_context=ctx, use_cache=False, logits_to_keep=last + 1).logits
    nll = F.cross_entropy(logits[0, :-1].float(), decoder[0, -last:])
    return math.exp(nll.item()), dict(ctx.stats)


def sweep_steps(plan: SweepPlan, num_configs: int, positions: int | None) -> int:
    """How many times :func:`context_sweep` calls ``progress`` (one per computed value)."""
    fits = lambda n: positions is None or n <= positions  # noqa: E731
    steps = len(plan.windows)  # the window alone
    for w in plan.windows:
        for c in plan.contexts:
            if c > 0:
                steps += 2 * num_configs  # SharedLLM, then its same-KV window
                steps += fits(c + w)  # full attention
    return steps


def context_sweep(base, ids: torch.Tensor, plan: SweepPlan, configs: dict, progress=None) -> list[CurveRow]:
    """Every row of the module docstring for the text's token ids ``ids [N >= T]``.

    ``configs``: row name -> SharedLLMConfig or trained-injector folder. ``base`` is left unwrapped;
    ``progress(label)`` is called before each computed value."""
    progress = progress or (lambda label: None)
    positions = max_positions(base)
    for w in plan.windows:
        if positions is not None and w > positions:
            raise ValueError(f"--window {w} exceeds the base model's max_position_embeddings {positions}")
    plan.split(ids, max(plan.windows), max(plan.contexts))  # checks the text is long enough

    def timed(label, fn):
        progress(label)
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    rows: list[CurveRow] = []
    for w in plan.windows:
        alone = CurveRow(f"window {w} alone", "window", w)
        (ppl, seconds) = timed(f"W={w} window alone", lambda: window_perplexity(base, plan.split(ids, w, 0)[1],
                                                                                 w, plan.last))
        for _ in plan.contexts:
            alone.add(ppl, w, seconds)
        rows.append(alone)

    # SharedLLM first (each config wrapped once): its compressed rows set the same-KV windows' sizes
    shared: dict[str, list[CurveRow]] = {}
    for name, config in configs.items():
        with wrapped(base, config) as model:
            for w, alone in zip(plan.windows, rows):
                row = CurveRow(name, "sharedllm", w)
                for c, window_ppl in zip(plan.contexts, alone.perplexity):
                    if c == 0:
                        row.add(window_ppl, w)
                        continue
                    context, decoder = plan.split(ids, w, c)
                    (ppl, stats), seconds = timed(f"W={w} C={c} {name}", lambda: sharedllm_window_perplexity(
                        model, context, decoder, plan.last))
                    row.add(ppl, w + stats["compressed_tokens"], seconds, stats)
                shared.setdefault(name, []).append(row)

    text = ids[:plan.total_tokens]
    for w, alone in zip(plan.windows, rows[:len(plan.windows)]):
        budgets: dict[int, tuple[float | None, float]] = {}  # window length -> (perplexity, seconds)
        for name in configs:
            sharedllm = next(r for r in shared[name] if r.window == w)
            same_kv = CurveRow(f"window with the KV budget of {name}", "same_kv", w)
            for c, window_ppl, kv in zip(plan.contexts, alone.perplexity, sharedllm.kv_tokens):
                if c == 0:
                    same_kv.add(window_ppl, w)
                    continue
                length = min(kv, w + c)  # no more tokens than exist before the scored segment
                progress(f"W={w} C={c} same KV ({length} tokens)")
                if length not in budgets:
                    if positions is not None and length > positions:
                        budgets[length] = (None, 0.0)
                    else:
                        start = time.perf_counter()
                        value = window_perplexity(base, text, length, plan.last)
                        budgets[length] = (value, time.perf_counter() - start)
                same_kv.add(budgets[length][0], length, budgets[length][1])
            rows.append(sharedllm)
            rows.append(same_kv)
        full = CurveRow("full attention", "full", w)
        for c, window_ppl in zip(plan.contexts, alone.perplexity):
            if c == 0:
                full.add(window_ppl, w)
            elif positions is not None and c + w > positions:
                full.add(None, None)
            else:
                context, decoder = plan.split(ids, w, c)
                value, seconds = timed(f"W={w} C={c} full attention",
                                       lambda: full_perplexity(base, torch.cat([context, decoder]), plan.last))
                full.add(value, c + w, seconds)
        rows.append(full)
    return _ordered(rows, plan.windows)


def _ordered(rows: list[CurveRow], windows) -> list[CurveRow]:
    """Rows grouped by window, in the order window alone, SharedLLM / same-KV pairs, full attention."""
    rank = {"window": 0, "sharedllm": 1, "same_kv": 1, "full": 2}
    return sorted(rows, key=lambda r: (windows.index(r.window), rank[r.kind]))
