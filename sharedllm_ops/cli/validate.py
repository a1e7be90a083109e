"""``sharedllm-ops validate``: the validation table of a trained injector on standard-library modules
(run by ``sharedllm_ops.model.demo.run_validate``): window / same-KV window / SharedLLM / full attention."""

from __future__ import annotations

import argparse

import torch

from ..dtypes import DTYPES
from .model_options import model_commands

HELP = "validation table of a trained injector: window / same-KV window / SharedLLM / full, gap recovered"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder or a .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--injector", default=None,
                        help="a trained injector folder, or 'none' for the training-free config (merge, compressed) "
                             "(default: the shipped one, for the embedded model)")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="SharedLLMConfig fields over the injector's config, e.g. '{\"tree_depth\": 5}' "
                             "(only what inference reads can change: not the injected layers of a trained injector)")
    parser.add_argument("--modules", nargs="+", default=None,
                        help="standard-library modules (default: text.EVAL_MODULES; 'selection' adds text.SELECTION_MODULES)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens taken from the start of each module (default: 8192)")
    parser.add_argument("--window", type=int, default=512, help="decoder window (default: 512)")
    parser.add_argument("--last", type=int, default=256, help="tokens scored at the end (default: 256)")
    parser.add_argument("--skip-full", action="store_true", help="leave full attention out")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default: float32)")


def run(args: argparse.Namespace) -> int:
    return model_commands().run_validate(args)
