"""``sharedllm-ops demo``: SharedLLM on SmolLM2-135M and standard-library text: context sizes, stage
times, memory, the perplexity table, a continuation (run by ``sharedllm_ops.model.demo.run_demo``)."""

from __future__ import annotations

import argparse

from .model_options import add_perplexity_arguments, model_commands

HELP = "SharedLLM on SmolLM2-135M and real text: sizes, times, perplexity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--module", default="inspect.py", help="standard-library module to read (default: inspect.py)")
    add_perplexity_arguments(parser, injector_default="the one shipped for the embedded SmolLM2")


def run(args: argparse.Namespace) -> int:
    return model_commands().run_demo(args)
