"""``sharedllm-ops eval-ppl``: the perplexity table (window / SharedLLM / full attention) for your
own model and texts (run by ``sharedllm_ops.model.demo.run_eval_ppl``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .model_options import add_perplexity_arguments, model_commands

HELP = "perplexity table (window / SharedLLM / full) for your model and texts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", nargs="+", required=True, type=Path, help="text files to evaluate on")
    add_perplexity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return model_commands().run_eval_ppl(args)
