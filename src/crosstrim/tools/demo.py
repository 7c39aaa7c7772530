"""``crosstrim demo``: a few testbed questions answered by the full and the trimmed model, side by side.

Runs on the checkpoint shipped in the package (or ``--model DIR``) in well under a minute on a CPU:
answers, the fraction of image tokens kept, the cross-attention KV cache saved, and a viz PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crosstrim.cli import options
from crosstrim.cli.options import load_model
from crosstrim.evaluation import UserError, sources
from crosstrim.evaluation.inference import predict
from crosstrim.testbed import data as testbed_data
from crosstrim.tools import viz


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="full vs trimmed answers on a few testbed questions")
    options.add_model_arguments(parser)
    parser.add_argument("--count", type=int, default=9, help="held-out questions to answer (default 9)")
    parser.add_argument("--viz", default="runs/demo.png", metavar="FILE", help="viz PNG to write")
    options.add_trim_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = options.trim_config(args)
    if args.count < 1:
        raise UserError("--count must be at least 1")
    model, processor, name = load_model(args.model, args.device, args.dtype)
    items = testbed_data.heldout(args.count)
    full = predict(model, processor, items, None, batch_size=len(items))
    trimmed = predict(model, processor, items, config, batch_size=len(items))
    print(f"model: {name}; trimming: {config.describe()}\n")
    width = max(len(item.prompt) for item in items)
    print(f"{'family':<11} {'question':<{width}}  {'answer':<8} {'full':<8} {'trimmed':<8} kept")
    for item, a, b in zip(items, full, trimmed):
        marks = ["" if sources.exact_match(item, p.text) else " x" for p in (a, b)]
        print(
            f"{item.category:<11} {item.prompt:<{width}}  {item.answer:<8} {a.text + marks[0]:<8} "
            f"{b.text + marks[1]:<8} {b.kept}/{b.valid} ({b.kept_fraction:.0%})"
        )
    kept = sum(p.kept for p in trimmed) / sum(p.valid for p in trimmed)
    kv_full = sum(p.kv_bytes_full for p in trimmed)
    kv_kept = sum(p.kv_bytes_kept for p in trimmed)
    correct = [sum(sources.exact_match(i, p.text) for i, p in zip(items, preds)) for preds in (full, trimmed)]
    same = sum(a.text == b.text for a, b in zip(full, trimmed))
    print(
        f"\ncorrect: full {correct[0]}/{len(items)}, trimmed {correct[1]}/{len(items)}; same answer {same}/{len(items)}"
    )
    print(
        f"kept {kept:.1%} of image tokens; cross-attention KV cache {kv_full / 1024:.1f} KiB -> "
        f"{kv_kept / 1024:.1f} KiB ({1 - kv_kept / kv_full:.0%} saved; the first cross layer keeps all tokens)"
    )
    path = Path(args.viz)
    viz.figure(items[1 % len(items)], model, processor, config, path)
    print(f"attention and kept tokens for {items[1 % len(items)].prompt!r}: {path}")
    return 0
