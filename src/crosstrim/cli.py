"""The ``crosstrim`` command: one subcommand per module in :mod:`crosstrim.tools`."""

from __future__ import annotations

import argparse
import importlib
import sys

from crosstrim.evaluation import UserError

# Each module defines ``register(subparsers)``, which adds its subcommand and sets ``run``.
TOOLS = ("generate", "batch", "kv", "bench", "testbed_cmd", "eval", "viz", "demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crosstrim", description="Trim the image features Llama-3.2-Vision attends to."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in TOOLS:
        importlib.import_module(f"crosstrim.tools.{name}").register(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"crosstrim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
