"""``sharedllm-ops eval-long``: context extension measured on any text: perplexity against context
length and passkey retrieval, as tables, JSON and plots (run by ``sharedllm_ops.model.long_eval``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..dtypes import DTYPES

HELP = "long context: perplexity vs context length and passkey retrieval (tables, JSON, plots)"
CONTEXTS = [0, 8192, 16384, 32768, 65536, 131072]
LENGTHS = [4096, 8192, 32768, 131072]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", action="append", type=Path, metavar="FILE",
                      help="a text file (repeatable: concatenated in order); default: the validation modules "
                           "text.EVAL_MODULES concatenated in order")
    text.add_argument("--module", action="append", metavar="NAME",
                      help="a standard-library module, e.g. inspect.py (repeatable: concatenated in order)")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder or a .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--injector", nargs="+", default=None, metavar="PATH|shipped|none",
                        help="SharedLLM rows: a trained injector folder, 'shipped' (the one for the embedded SmolLM2) "
                             "or 'none' (the training-free merge, compressed); default: shipped for the embedded "
                             "model, none for --model")
    parser.add_argument("--window", nargs="+", type=int, default=[512], metavar="W",
                        help="decoder window(s), up to the model's max_position_embeddings (default: 512)")
    parser.add_argument("--last", type=int, default=256, help="tokens scored at the end of the window (default: 256)")
    parser.add_argument("--contexts", nargs="+", type=int, default=CONTEXTS, metavar="C",
                        help="context lengths before the window, increasing (default: 0 8K 16K 32K 64K 128K)")
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS, metavar="N",
                        help="passkey prompt lengths in tokens (default: 4096 8192 32768 131072)")
    parser.add_argument("--depths", nargs="+", type=float, default=DEPTHS, metavar="D",
                        help="passkey depths in the context, 0 = its start, 1 = its end (default: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--keys", type=int, default=1, help="passkeys per (length, depth) (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkeys (default: 0)")
    parser.add_argument("--tasks", nargs="+", choices=("perplexity", "passkey"), default=["perplexity", "passkey"],
                        help="what to measure (default: both)")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="chunk length of the training-free config (--injector none) (default: 1024)")
    parser.add_argument("--config", action="append", default=None, metavar="JSON",
                        help="SharedLLMConfig fields over each --injector's config (the training-free one for "
                             "'none'), e.g. '{\"anchor_tokens\": 16}' (repeatable: one row per injector and config, "
                             "named with its fields; '{}' keeps the plain row; a trained injector's own layers and "
                             "cross blocks cannot change)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default: float32)")
    parser.add_argument("--output", default="runs/eval-long",
                        help="folder of results.md, results.json and the plots (default: runs/eval-long)")


def run(args: argparse.Namespace) -> int:
    try:
        # imported here: transformers takes seconds to load and the other commands never need it
        from ..model import long_eval
    except ImportError as e:
        sys.exit(f"sharedllm-ops: eval-long needs transformers ({e}); pip install 'sharedllm_ops[model]'")
    return long_eval.run_eval_long(args)
