"""What the model commands (``demo``, ``eval-ppl``, ``train``) share: the options of a perplexity
run and the import of their bodies, ``sharedllm_ops.model.demo``, which needs transformers."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

import torch

from ..dtypes import DTYPES


def add_perplexity_arguments(parser: argparse.ArgumentParser, *, injector_default: str = "") -> None:
    """The options shared by ``demo`` and ``eval-ppl``: the model, the window and the scored tokens."""
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder or a .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--injector", default=None,
                        help="a trained injector folder (save_pretrained / train checkpoint): adds its row"
                             + (f" (default: {injector_default})" if injector_default else ""))
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens taken from the start of each text (default: 8192)")
    parser.add_argument("--window", type=int, default=512, help="decoder window (default: 512)")
    parser.add_argument("--last", type=int, default=256, help="tokens scored at the end (default: 256)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="context chunk length (default: 1024)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default: float32)")


def model_commands() -> ModuleType:
    """``sharedllm_ops.model.demo``, or exit with the install command if transformers is missing."""
    try:
        # imported here, not at the top: transformers takes seconds to load and info/ops never need it
        from ..model import demo
    except ImportError as e:
        sys.exit(f"sharedllm-ops: the model commands need transformers ({e}); pip install 'sharedllm_ops[model]'")
    return demo
