"""What the tools share on the command line: option spellings (every command spells them the same way),
the :class:`~crosstrim.TrimConfig` they describe, the model ``--model`` names, the progress bar, the parsers of
comma-separated option values and plain-text tables."""

from __future__ import annotations

import argparse

from crosstrim.core import TrimConfig, method_names
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.evaluation.sweep import Setting, plan


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (default: the testbed shipped in the package), ``--device``, ``--dtype`` and ``--threads``."""
    parser.add_argument(
        "--model", metavar="DIR", help="local checkpoint folder (save_pretrained); default: the built-in testbed"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
    add_dtype_argument(parser, "model dtype", "auto: bf16 on GPU, fp32 on CPU")
    add_threads_argument(parser)


def load_model(model_dir: str | None, device: str = "auto", dtype: str = "auto"):
    """``(model, processor, name)`` of what ``--model`` names: a checkpoint folder, or the built-in testbed when
    none is given (the one place the CLI's default model is decided)."""
    if model_dir:
        model, processor = checkpoint.load(model_dir, device, dtype)
        return model, processor, str(model_dir)
    from crosstrim import testbed

    model, processor = testbed.load(device, dtype)
    return model, processor, "testbed"


def add_dtype_argument(parser: argparse.ArgumentParser, what: str, default: str) -> None:
    """``--dtype``, spelled alike by every command (checked where it is used)."""
    parser.add_argument(
        "--dtype", default="auto", help=f"{what}: fp32/float32, bf16/bfloat16, fp16/float16 or {default} (default)"
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads, set by :func:`crosstrim.cli.main` before the command runs."""
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")


def add_trim_arguments(parser: argparse.ArgumentParser) -> None:
    """The trimming flags; their values stay strings for :meth:`TrimConfig.from_options`, the one option parser
    (so ``--k-ratio abc`` is an error naming ``--k-ratio``, as every other bad value is)."""
    group = parser.add_argument_group("trimming")
    group.add_argument("--method", default="trimmed", choices=method_names(), help="selection rule (default: trimmed)")
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


def add_sweep_arguments(parser: argparse.ArgumentParser, *, methods: str, what: str) -> None:
    """The sweep flags of ``eval`` and ``calibrate`` (comma-separated values, parsed by :func:`sweep_settings`)."""
    parser.add_argument("--k-ratios", default="0.5,0.25,0.15,0.1,0.05", help="trimmed k_ratio sweep")
    parser.add_argument("--keep-ratios", default="0.75,0.5,0.25,0.1", help="exact-budget sweep for every method")
    parser.add_argument("--methods", default=methods, help="methods of the exact-budget sweep (comma-separated)")
    parser.add_argument(
        "--summarize-dropped",
        action="store_true",
        help=f"also {what} every selection with TrimConfig.summarize_dropped (not in the paper)",
    )
    parser.add_argument("--seed", default=0, help="seed of the random baseline")


def sweep_settings(args: argparse.Namespace) -> list[Setting]:
    """The settings the sweep flags describe (:func:`crosstrim.evaluation.sweep.plan`); a bad value is a
    one-line error naming its flag."""

    def listed(text: str) -> list[str]:  # empty values dropped: --k-ratios "" sweeps none
        return [value.strip() for value in text.split(",") if value.strip()]

    try:
        return plan(
            listed(args.k_ratios), listed(args.keep_ratios), listed(args.methods), args.summarize_dropped, args.seed
        )
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
