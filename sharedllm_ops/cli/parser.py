"""The ``sharedllm-ops`` argument parser and :func:`main`. Each command's module declares its
``HELP``, adds its options (``add_arguments``) and runs it (``run``)."""

from __future__ import annotations

import argparse

import torch

from . import demo, eval_long, eval_ppl, info, ops, train, validate

# command name -> its module, in the order ``--help`` lists them
COMMANDS = {"info": info, "demo": demo, "eval-ppl": eval_ppl, "eval-long": eval_long, "train": train, "validate": validate,
            "ops": ops}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharedllm-ops", description="SharedLLM kernels and model: build info, "
                                     "kernel check, demo, perplexity, long context, training.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        command = commands.add_parser(name, help=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sharedllm-ops``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ops" and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args.run(args)
