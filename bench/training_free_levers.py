"""Training-free comparison of how the 8x tree's keys are pooled and placed (issue 16, README "The model").

Every variant is ``injection="merge"`` with every layer injected, chunks of 1024, tree depth 3, 32
rows per node and query retrieval; only ``positions``, ``pool_mode`` and ``drop_node_sinks`` change.
Scored as everywhere else: the last 256 of the first 8192 tokens of a module, a 512-token window,
the window's tokens before the scored ones as the retrieval query.

    python -m bench.training_free_levers --modules functools.py inspect.py
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm.auto import tqdm

from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM
from sharedllm_ops.model.evaluate import sharedllm_perplexity
from sharedllm_ops.model.pretrained import load_base_model
from sharedllm_ops.model.text import module_text, tokenize_text, window_perplexity, full_perplexity

# name -> (positions, pool_mode, drop_node_sinks)
VARIANTS = {
    "mean, true positions": ("true", "mean", False),
    "mean, true positions, no node sinks": ("true", "mean", True),
    "strided, true positions": ("true", "first", False),
    "mean, Eq. 2 chunk positions": ("chunk", "mean", False),
    "strided, Eq. 2 chunk positions": ("chunk", "first", False),
    "mean before rotary, distance positions": ("distance", "mean", False),
    "mean before rotary, distance positions, no node sinks": ("distance", "mean", True),
    "strided, distance positions": ("distance", "first", False),
    "strided, distance positions, no node sinks": ("distance", "first", True),
}


def variant_config(num_layers: int, positions: str, pool_mode: str, drop_node_sinks: bool) -> SharedLLMConfig:
    return SharedLLMConfig(num_injected_layers=num_layers, chunk_size=1024, injection="merge", tree_depth=3,
                           tokens_per_node=32, retrieval="query", positions=positions, pool_mode=pool_mode,
                           drop_node_sinks=drop_node_sinks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=["functools.py", "inspect.py"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    base, tokenizer = load_base_model(None)
    num_layers = len(base.model.layers)
    table = {}
    bar = tqdm(total=len(args.modules) * (len(args.variants) + 2), unit="row")
    for module in args.modules:
        ids = tokenize_text(tokenizer, module_text(module), 8192)
        column = {"window 512 only": window_perplexity(base, ids, 512, 256)}
        bar.update(1)
        for name in args.variants:
            bar.set_postfix_str(f"{module}: {name}")
            model = SharedLLMForCausalLM.from_base(base, variant_config(num_layers, *VARIANTS[name]))
            try:
                with torch.no_grad():
                    column[name] = sharedllm_perplexity(model, ids, 512, 256)[0]
            finally:
                model.unwrap()
            bar.update(1)
        column["full attention"] = full_perplexity(base, ids, 256)
        bar.update(1)
        table[module] = column
    bar.close()
    rows = list(next(iter(table.values())))
    print("| keys of the 8x tree | " + " | ".join(args.modules) + " | geometric mean |")
    print("|---" * (len(args.modules) + 2) + "|")
    for row in rows:
        values = [table[m][row] for m in args.modules]
        mean = math.exp(sum(map(math.log, values)) / len(values))
        print(f"| {row} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {mean:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
