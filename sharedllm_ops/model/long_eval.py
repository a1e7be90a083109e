"""The body of ``sharedllm-ops eval-long`` (its options are parsed in ``sharedllm_ops.cli.eval_long``):
load the model and the text, run the perplexity-vs-context sweep (``long_context.py``) and the passkey
grid (``passkey.py``) under one progress bar, then print and write the report (``long_report.py``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..dtypes import DTYPES
from .config import SharedLLMConfig
from .evaluate import TRAINING_FREE_ROW, config_overrides, peak_rss_gb, training_free_configs
from .long_context import SweepPlan, context_sweep, max_positions, sweep_steps
from .long_report import PLOT_HINT, write_report
from .passkey import passkey_grid, passkey_items, passkey_steps
from .pretrained import load_base_model, shipped_injector
from .text import EVAL_MODULES, module_text, stdlib_dir, tokenize_text

__all__ = ["injector_configs", "run_eval_long", "text_sources"]

SEPARATOR = "\n\n"  # between concatenated texts


def text_sources(args) -> tuple[list[tuple[str, str]], str]:
    """``([(name, text), ...], description)`` of ``--text`` files, ``--module`` names or, by default,
    the validation modules of ``text.EVAL_MODULES`` concatenated in order."""
    if args.text:
        return [(str(p), Path(p).read_text(encoding="utf-8", errors="replace")) for p in args.text], "--text files"
    if args.module:
        return [(m, module_text(m)) for m in args.module], f"standard-library modules under {stdlib_dir()}"
    return ([(m, module_text(m)) for m in EVAL_MODULES],
            f"the validation modules text.EVAL_MODULES concatenated in order (no single one is long enough), "
            f"from {stdlib_dir()}")


def _tokenize(tokenizer, sources, max_tokens: int) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """The concatenated token ids (each text tokenized on its own, so its span is known) cut to
    ``max_tokens``, and each used text's ``(name, first, end)`` span."""
    pieces, spans, total = [], [], 0
    for name, text in sources:
        if total >= max_tokens:
            break
        ids = tokenize_text(tokenizer, text + SEPARATOR, max_tokens - total)
        pieces.append(ids)
        spans.append((name, total, total + ids.numel()))
        total += ids.numel()
    return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)), spans


def _described(config) -> dict | str:
    """What results.json records of a row's config: its fields, its injector folder, or both."""
    if isinstance(config, SharedLLMConfig):
        return config.to_dict()
    if isinstance(config, tuple):
        return {"injector": config[0], "overrides": config[1]}
    return str(config)


def injector_configs(args, base) -> dict:
    """Row name -> SharedLLMConfig, injector folder, or ``(folder, overrides)``, for each ``--injector``
    value (default: the shipped injector for the embedded SmolLM2, the training-free config for any
    other model) and each ``--config`` (one row per pair; without ``--config``, the plain rows)."""
    choices = args.injector or (["shipped"] if args.model is None else ["none"])
    texts = getattr(args, "config", None) or [None]
    configs = {}
    for choice in choices:
        if choice == "none":
            name, config = TRAINING_FREE_ROW, training_free_configs(len(base.model.layers), args.chunk_size)[TRAINING_FREE_ROW]
        elif choice == "shipped":
            config = shipped_injector()
            if config is None:
                raise SystemExit("--injector shipped: this installation ships no injector; pass a folder or 'none'")
            name = "SharedLLM (shipped injector)"
        else:
            if not (Path(choice) / "sharedllm_config.json").is_file():
                raise SystemExit(f"--injector {choice}: not a folder written by save_pretrained "
                                 "(no sharedllm_config.json)")
            name, config = f"SharedLLM (injector {choice})", choice
        for text in texts:
            if text is None:
                configs[name] = config
                continue
            overrides = config_overrides(text)
            try:  # an unknown field or a bad value, named before any model runs
                checked = config if isinstance(config, SharedLLMConfig) else SharedLLMConfig.load(config)
                checked = dataclasses.replace(checked, **overrides)
            except (ValueError, TypeError) as e:
                raise SystemExit(f"--config {text}: {e}") from None
            configs[f"{name}, {text}"] = checked if isinstance(config, SharedLLMConfig) else (str(config), overrides)
    return configs


class _Progress:
    """``step(label)`` before each work item: a tqdm bar (stderr) when tqdm is installed, else lines."""

    def __init__(self, total: int):
        try:
            from tqdm.auto import tqdm  # comes with the [model] extra
        except ImportError:  # pragma: no cover
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="eval-long", unit="item")
        self.started = False

    def __call__(self, label: str) -> None:
        if self.bar is None:
            print(f"... {label}", flush=True)
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(label)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1 if self.started else 0)
            self.bar.close()


def _check_arguments(args) -> SweepPlan | None:
    """The checks that need no model, before it loads: a clear SystemExit naming the option."""
    if args.chunk_size < 32:
        raise SystemExit(f"--chunk-size must be >= 32 (the training-free config keeps chunk_size // 32 rows per "
                         f"node), got {args.chunk_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    missing = [str(p) for p in args.text or () if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"--text: no such file: {', '.join(missing)}")
    for text in getattr(args, "config", None) or ():
        config_overrides(text)
    if any(w < 2 for w in args.window):
        raise SystemExit(f"--window must be >= 2, got {args.window}")
    if "passkey" in args.tasks:
        if args.keys < 1:
            raise SystemExit(f"--keys must be >= 1, got {args.keys}")
        if not all(0.0 <= d <= 1.0 for d in args.depths):
            raise SystemExit(f"--depths must lie in [0, 1], got {args.depths}")
        if any(n < 1 for n in args.lengths):
            raise SystemExit(f"--lengths must be positive, got {args.lengths}")
    if "perplexity" not in args.tasks:
        return None
    try:
        return SweepPlan(tuple(args.contexts), tuple(args.window), args.last)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def run_eval_long(args) -> int:
    plan = _check_arguments(args)
    start = time.perf_counter()
    base, tokenizer = load_base_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    positions = max_positions(base)
    if positions is not None and max(args.window) > positions:
        raise SystemExit(f"--window {max(args.window)} exceeds the base model's max_position_embeddings {positions}")
    configs = injector_configs(args, base)
    items = None
    if "passkey" in args.tasks:
        try:  # the prompts, built before any long computation so that a bad length fails now
            items = passkey_items(tokenizer, args.window, args.lengths, args.depths, args.keys, args.seed)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    settings = dict(model=args.model or "embedded SmolLM2-135M-Instruct", max_position_embeddings=positions,
                    injectors={name: _described(c) for name, c in configs.items()},
                    windows=list(args.window), device=args.device, dtype=args.dtype,
                    threads=torch.get_num_threads(), load_s=round(time.perf_counter() - start, 1))
    print(f"eval-long: {settings['model']} (positions {positions}), {args.dtype} on {args.device}; "
          f"rows: {', '.join(configs)}", flush=True)

    ids = None
    if plan is not None:
        try:
            sources, description = text_sources(args)
        except FileNotFoundError as e:  # a --module name that is not in the standard library
            raise SystemExit(f"--module: {e}") from None
        ids, spans = _tokenize(tokenizer, sources, plan.total_tokens)
        if ids.numel() < plan.total_tokens:
            raise SystemExit(f"the text has {ids.numel()} tokens, but --contexts up to {max(plan.contexts)} with "
                             f"--window {max(plan.windows)} need {plan.total_tokens}: add --text/--module or "
                             "lower --contexts")
        scored_in = [name for name, first, end in spans if first < plan.scored.stop and end > plan.scored.start]
        settings.update(text=description, text_spans=[list(s) for s in spans], contexts=list(plan.contexts),
                        last=plan.last, total_tokens=plan.total_tokens, scored_in=scored_in)
        print(f"text     {description}: the first {plan.total_tokens} tokens ({', '.join(n for n, _, _ in spans)}); "
              f"scored: the last {plan.last} (in {', '.join(scored_in)})", flush=True)
    if "passkey" in args.tasks:
        settings.update(lengths=list(args.lengths), depths=list(args.depths), keys=args.keys, seed=args.seed)

    total = (sweep_steps(plan, len(configs), positions) if plan is not None else 0)
    if items is not None:
        total += passkey_steps(items, len(configs), positions)
    progress = _Progress(total)
    rows = passkey = None
    try:
        if plan is not None:
            started = time.perf_counter()
            rows = context_sweep(base, ids, plan, configs, progress)
            settings["perplexity_s"] = round(time.perf_counter() - started, 1)
            write_report(Path(args.output), settings, plan, rows, None)  # kept if the passkey run is stopped
        if items is not None:
            started = time.perf_counter()
            results = passkey_grid(base, tokenizer, configs, items, progress)
            passkey = dict(results=results, windows=args.window, lengths=args.lengths, depths=args.depths)
            settings["passkey_s"] = round(time.perf_counter() - started, 1)
    finally:
        progress.close()
    settings["peak_rss_gb"] = round(peak_rss_gb(), 2)
    markdown, files = write_report(Path(args.output), settings, plan, rows, passkey)
    print()
    print(markdown)
    print("wrote " + ", ".join(str(f) for f in files))
    if not any(f.suffix == ".png" for f in files):
        print(f"no plots: {PLOT_HINT}")
    return 0
