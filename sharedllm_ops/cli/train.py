"""``sharedllm-ops train``: train SharedLLM's cross blocks on text (continual pre-training), then the
held-out perplexity table (run by ``sharedllm_ops.model.demo.run_train``)."""

from __future__ import annotations

import argparse

import torch

from ..dtypes import DTYPES
from .model_options import model_commands

HELP = "train SharedLLM's cross blocks on text (continual pre-training)"
# options that set the TrainConfig field of the same name (dashes for underscores); defaults there
CONFIG_OPTIONS = (("steps", int), ("batch-size", int), ("grad-accum", int), ("lr", float), ("warmup", int),
                  ("weight-decay", float), ("context-tokens", int), ("min-context-tokens", int),
                  ("decoder-tokens", int), ("top-layers", int), ("seed", int), ("save-every", int),
                  ("distill-weight", float), ("distill-context-tokens", int), ("copy-fraction", float),
                  ("copy-tokens", int))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model folder or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", nargs="*", default=[],
                        help="text files, folders, 'stdlib' (the standard-library training packages) or 'site-packages:MB' "
                             "(a sample of MB megabytes of the installed third-party sources); default: stdlib")
    parser.add_argument("--output", default="runs/sharedllm", help="checkpoint folder (default: runs/sharedllm)")
    for name, kind in CONFIG_OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--init-from", default=None,
                        help="an injector folder to start from: its weights, and its config with the run's SharedLLM "
                             "fields (the defaults and --config) over it")
    parser.add_argument("--trainable", choices=("cross", "cross+top"), default=None)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if --output has checkpoints")
    parser.add_argument("--config", default=None, help="SharedLLMConfig fields as JSON, e.g. '{\"num_injected_layers\": 4}'")
    parser.add_argument("--eval-modules", nargs="*", default=None,
                        help="standard-library modules for the final perplexity table (default: text.EVAL_MODULES; none: skip)")
    parser.add_argument("--skip-full", action="store_true",
                        help="leave full attention (slow) out of the final table; by default it is there where the text fits")


def run(args: argparse.Namespace) -> int:
    try:
        return model_commands().run_train(args)
    finally:
        # under torchrun: a gloo group left alive at exit can abort the process from its threads
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
