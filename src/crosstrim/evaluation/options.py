"""What the tools share on the command line: option spellings (every command spells them the same way),
the :class:`~crosstrim.TrimConfig` they describe, the progress bar, the parsers of comma-separated option
values and plain-text tables."""

from __future__ import annotations

import argparse

from crosstrim.config import METHODS, TrimConfig
from crosstrim.evaluation import UserError


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, metavar="DIR", help="local checkpoint folder (save_pretrained)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU)")


def add_trim_arguments(parser: argparse.ArgumentParser) -> None:
    """The trimming flags; their values stay strings for :meth:`TrimConfig.from_options`, the one option parser
    (so ``--k-ratio abc`` is an error naming ``--k-ratio``, as every other bad value is)."""
    group = parser.add_argument_group("trimming")
    group.add_argument("--method", default="trimmed", choices=METHODS, help="selection rule (default: trimmed)")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--k-ratio", help="per-head top-k ratio, adaptive kept count (default 0.25)")
    budget.add_argument("--keep-ratio", help="exact kept fraction per image")
    group.add_argument("--seed", default=0, help="seed of the random baseline")
    group.add_argument(
        "--trim-first-layer-cache", action="store_true", help="also shrink the first cross layer's KV cache"
    )
    group.add_argument(
        "--summarize-dropped",
        action="store_true",
        help="later layers also attend one mean token per image for what it dropped (not in the paper)",
    )


# The TrimConfig field each trimming flag sets, spelled as the user types it.
TRIM_FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in ("method", "k_ratio", "keep_ratio", "seed", "trim_first_layer_cache", "summarize_dropped")
}


def trim_config(args: argparse.Namespace) -> TrimConfig:
    """Build the ``TrimConfig`` the trimming flags describe; a bad value is a one-line error naming its flag."""
    try:
        return TrimConfig.from_options({name: getattr(args, name) for name in TRIM_FLAGS}, names=TRIM_FLAGS)
    except ValueError as err:
        raise UserError(str(err)) from err


def progress_bar():
    """The progress bar every long-running tool shows (on stderr, so stdout stays the result)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=Console(stderr=True),
    )


def ints(text: str, name: str) -> list[int]:
    """Positive integers from ``"1,2,8"``; option ``name`` is named in the error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise UserError(f"{name} must be positive integers, got {text!r}")
    return values


def fractions(text: str, name: str = "--keep") -> list[float]:
    """Fractions in (0, 1] from ``"0.5,0.25"``; option ``name`` is named in the error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{name} must be comma-separated fractions in (0, 1], got {text!r}") from err
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise UserError(f"{name} must be fractions in (0, 1], e.g. 0.5,0.25; got {text!r}")
    return values


def table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a header and a rule of dashes."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
