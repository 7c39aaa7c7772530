"""The ``crosstrim`` command: one subcommand per module in :mod:`crosstrim.tools`; the options they share
are in :mod:`crosstrim.cli.options`."""

from __future__ import annotations

import argparse
import importlib
import sys

import crosstrim
from crosstrim.evaluation import UserError

# Each module defines ``register(subparsers)``, which adds its subcommand and sets ``run``.
TOOLS = ("generate", "batch", "kv", "bench", "testbed_cmd", "eval", "calibrate", "viz", "demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crosstrim", description="Trim the image features Llama-3.2-Vision attends to."
    )
    parser.add_argument("--version", action="version", version=f"crosstrim {crosstrim.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in TOOLS:
        importlib.import_module(f"crosstrim.tools.{name}").register(subparsers)
    args = parser.parse_args(argv)
    try:
        _set_threads(getattr(args, "threads", None))
        return args.run(args)
    except UserError as err:
        print(f"crosstrim {args.command}: error: {err}", file=sys.stderr)
        return 2


def _set_threads(threads: int | None) -> None:
    """Apply a command's ``--threads`` (every command that runs a model has it; ``None``: torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
