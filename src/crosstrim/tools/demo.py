"""``crosstrim demo``: a few testbed questions answered by the full and the trimmed model, side by side.

Runs on the checkpoint shipped in the package (or ``--model DIR``) in well under a minute on a CPU:
answers, the fraction of image tokens kept, the cross-attention KV cache saved, and a PNG of one question
(the first layer's attention and the kept tokens). With ``--summarize-dropped`` the paper's trimming and the
summarised one are answered and drawn side by side: they keep the same tokens, so only the summary differs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from crosstrim.cli import options
from crosstrim.cli.options import load_model
from crosstrim.core import TrimConfig
from crosstrim.engine.memory import format_bytes
from crosstrim.evaluation import UserError, sources
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import Prediction, encode, predict
from crosstrim.testbed import data as testbed_data


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="full vs trimmed answers on a few testbed questions")
    options.add_model_arguments(parser)
    parser.add_argument("--count", type=int, default=9, help="held-out questions to answer (default 9)")
    parser.add_argument("--viz", default="runs/demo.png", metavar="FILE", help="PNG to write")
    options.add_trim_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = options.trim_config(args)
    if args.count < 1:
        raise UserError("--count must be at least 1")
    # The paper's trimming always; with --summarize-dropped the summarised one beside it.
    configs = [replace(config, summarize_dropped=False)] + ([config] if config.summarize_dropped else [])
    model, processor, name = load_model(args.model, args.device, args.dtype)
    items = testbed_data.heldout(args.count)
    full = predict(model, processor, items, None, batch_size=len(items))
    trimmed = [predict(model, processor, items, c, batch_size=len(items)) for c in configs]
    print(f"model: {name}; trimming: {' and '.join(c.describe() for c in configs)}\n")
    columns = ["full", "trimmed"] + (["+summary"] if len(configs) > 1 else [])
    width = max(len(item.prompt) for item in items)
    print(f"{'family':<11} {'question':<{width}}  {'answer':<8} " + " ".join(f"{c:<8}" for c in columns) + " kept")
    for i, item in enumerate(items):
        answers = [full[i]] + [t[i] for t in trimmed]
        cells = " ".join(f"{p.text + ('' if sources.exact_match(item, p.text) else ' x'):<8}" for p in answers)
        kept = trimmed[0][i]
        print(f"{item.category:<11} {item.prompt:<{width}}  {item.answer:<8} {cells} {kept.kept}/{kept.valid} "
              f"({kept.kept_fraction:.0%})")  # fmt: skip
    scores = []
    for label, preds in zip(columns, [full, *trimmed]):
        correct = sum(sources.exact_match(i, p.text) for i, p in zip(items, preds))
        same = sum(a.text == b.text for a, b in zip(full, preds))
        scores.append(f"{label} {correct}/{len(items)}" + ("" if preds is full else f" (same as full: {same})"))
    print("\ncorrect: " + ", ".join(scores))
    kept = sum(p.kept for p in trimmed[0]) / sum(p.valid for p in trimmed[0])
    kv_full = sum(p.kv_bytes_full for p in trimmed[0])
    kv = [sum(p.kv_bytes_kept for p in preds) for preds in trimmed]
    print(
        f"kept {kept:.1%} of image tokens; cross-attention KV cache {format_bytes(kv_full)} -> "
        + " and ".join(f"{format_bytes(b)} {label} ({1 - b / kv_full:.0%} saved)" for b, label in zip(kv, columns[1:]))
        + "; the first cross layer keeps all tokens"
    )
    # Draw the first question whose answers differ (where trimming matters), else the second one.
    differ = [i for i in range(len(items)) if len({p[i].text for p in [full, *trimmed]}) > 1]
    shown = differ[0] if differ else 1 % len(items)
    why = "the first question whose answers differ" if differ else "no answers differ"
    path = Path(args.viz)
    figure(items[shown], model, processor, configs, [p[shown] for p in [full, *trimmed]], path)
    print(f"\nfirst-layer attention and kept tokens for {items[shown].prompt!r} ({why}): {path}")
    return 0


def figure(item: Item, model, processor, configs: list[TrimConfig], answers: list[Prediction], path: Path) -> None:
    """The first layer's attention, then the tokens each of ``configs`` keeps with its answer (``answers``:
    the full model's, then one per config)."""
    from crosstrim.plots import attention, style  # matplotlib loads only when a figure is drawn

    inputs = dict(encode(processor, [item], model.device))
    view = attention.canvas(model, processor, inputs)
    recorded = [attention.record(model, inputs, c) for c in configs]
    height, width = view.pixels.shape[:2]
    panel = 2.6 * min(1.3, max(0.45, height / width))
    cols = 1 + len(configs)
    with style.figure(path, dpi=130, figsize=(cols * 3.5, panel + 2.0), layout="constrained") as fig:
        axes = fig.subplots(1, cols, squeeze=False)[0]
        first, _ = recorded[0]
        attention.attention_panel(axes[0], view, first.scores[0].sum(0).cpu(), "(a) where the first cross-attention "
                                  "layer looks\n(what trimming scores)")  # fmt: skip
        for i, (config, (_, stats), answer) in enumerate(zip(configs, recorded, answers[1:])):
            mark = "right" if sources.exact_match(item, answer.text) else "wrong"
            attention.kept_panel(
                axes[1 + i], view, {int(t) for t in stats.kept_indices[0]}, summarized=config.summarize_dropped,
                title=f"({'bc'[i]}) {config.describe()}: keeps {stats.kept_counts[0]} of {stats.valid_counts[0]} "
                f"tokens\nanswer: {answer.text!r} ({mark})",
            )  # fmt: skip
        verdict = "right" if sources.exact_match(item, answers[0].text) else "wrong"
        fig.suptitle(f"{item.prompt}   right answer: {item.answer}   full model: {answers[0].text!r} ({verdict})")
