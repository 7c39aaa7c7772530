"""``crosstrim viz``: where the cross-attention layers look and what trimming keeps (the paper's Fig. 4).

One PNG: (a) the first cross-attention layer's attention, summed over heads and over the text rows
that may see the image, over the image tiles; (b) the tokens the chosen selection keeps; (c), (d), ... the same
aggregate for every *later* cross-attention layer of the untrimmed model, each titled with how many of
its most-attended tokens the first layer also ranks on top -- the paper's observation that the same
tokens stay important across layers is what makes selecting once, at the first layer, sound. The
drawing itself is :mod:`crosstrim.plots.attention`, shared with ``crosstrim demo``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from crosstrim.adapters import adapter_for
from crosstrim.cli import options
from crosstrim.cli.options import load_model
from crosstrim.core import TrimConfig
from crosstrim.engine.memory import format_bytes
from crosstrim.engine.scores import cross_attention_scores
from crosstrim.engine.stats import FirstLayerScores
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import encode, predict
from crosstrim.testbed import data as testbed_data
from crosstrim.testbed import prompt_warning


@dataclass(frozen=True)
class Attention:
    """Per cross-attention layer, the attention every image token of sample 0 receives, summed over heads."""

    layers: tuple[int, ...]
    scores: dict[int, torch.Tensor]  # layer -> (N,) float32, heads and scoring rows summed
    valid: torch.Tensor  # (N,) bool: tokens any scoring row may attend (padding tiles are not)


def cross_attention(model, inputs: dict[str, torch.Tensor], first: FirstLayerScores) -> Attention:
    """Aggregate attention of every cross-attention layer of the untrimmed model, for sample 0.

    The first layer's is what the trim handle scored (``first``, recorded with
    ``TrimHandle.record_scores``): that layer attends every image token, trimmed or not. The later
    layers, which the method never scores, are scored the same way by the engine
    (:func:`crosstrim.engine.scores.cross_attention_scores`: one untrimmed prefill, sdpa, no eager attention).
    """
    adapter = adapter_for(model)
    layers = tuple(adapter.cross_layers(adapter.decoder(model)))
    scores = {first.layer: first.scores[0].sum(0).cpu()}
    later = [idx for idx in layers if idx != first.layer]
    if later:
        for idx, per_head in cross_attention_scores(model, inputs, later).items():
            scores[idx] = per_head[0].sum(0).cpu()
    return Attention(layers, scores, first.valid[0].cpu())


TOP = 0.25  # panel (c) compares each layer's top quarter of valid tokens with the first layer's


def overlap(first: torch.Tensor, other: torch.Tensor, valid: torch.Tensor, fraction: float = 0.25) -> float:
    """Share of ``other``'s top ``fraction`` valid tokens that are also among ``first``'s top ones."""
    count = max(1, math.ceil(fraction * int(valid.sum())))
    top = {int(i) for i in torch.topk(first.masked_fill(~valid, -1), count).indices}
    return len(top & {int(i) for i in torch.topk(other.masked_fill(~valid, -1), count).indices}) / count


def figure(item: Item, model, processor, config: TrimConfig, path: Path) -> dict:
    """Draw the panels for ``item`` and save them to ``path``; returns what the figure shows."""
    from crosstrim.plots import attention, style  # matplotlib loads only when a figure is drawn

    inputs = dict(encode(processor, [item], model.device))
    first, stats = attention.record(model, inputs, config)
    per_layer = cross_attention(model, inputs, first)
    view = attention.canvas(model, processor, inputs)
    kept = {int(i) for i in stats.kept_indices[0]}
    full_answer = predict(model, processor, [item], None)[0].text
    trimmed_answer = predict(model, processor, [item], config)[0].text

    # Row 1: the first layer, what it kept, the numbers. Row 2 on: every *later* layer of the untrimmed model.
    later = per_layer.layers[1:]
    cols = max(3, min(len(later), 4))
    rows = 1 + -(-len(later) // cols)
    height, width = view.pixels.shape[:2]
    panel = 2.6 * min(1.3, max(0.45, height / width))  # image height in inches at 2.6 in wide, bounded
    first_scores = per_layer.scores[per_layer.layers[0]]
    valid = int(per_layer.valid.sum())
    top = max(1, math.ceil(TOP * valid))
    overlaps = {}
    with style.figure(path, dpi=130, figsize=(cols * 3.5, rows * (panel + 1.0)), layout="constrained") as fig:
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        attention.attention_panel(
            axes[0][0], view, first_scores, f"(a) layer {per_layer.layers[0]}, the first cross-attention layer:\n"
            "where it looks (what trimming scores)",
        )  # fmt: skip
        attention.kept_panel(
            axes[0][1], view, kept, summarized=config.summarize_dropped,
            title=f"(b) kept by {config.describe()} for the later layers:\n"
            f"{stats.kept_counts[0]} of {stats.valid_counts[0]} tokens ({stats.kept_fraction[0]:.0%})",
        )  # fmt: skip
        per_tile = len(view.boxes) // len(view.cls_tokens) + 1
        counts = [sum(start <= t < start + per_tile for t in kept) for start in view.cls_tokens]
        full_kv, kept_kv = stats.sample_kv_bytes(0)
        fig.suptitle(
            f"{item.prompt}   right answer: {item.answer or '?'}   full model: {full_answer!r}   "
            f"{config.describe()}: {trimmed_answer!r}"
        )
        lines = [
            f"{len(view.cls_tokens)} tile(s) x {per_tile} tokens",
            f"  (1 CLS + {per_tile - 1} patches each)",
            f"kept per tile: {', '.join(map(str, counts))}",
            f"cross-attn KV: {format_bytes(full_kv)} -> {format_bytes(kept_kv)}",
            f"(first cross layer keeps all {stats.image_tokens} tokens;",
            f" later layers see {stats.kept_counts[0]})",
        ]
        axes[0][2].text(0.0, 0.5, "\n".join(lines), fontsize=8, va="center", family="monospace")
        for i, idx in enumerate(later):
            overlaps[idx] = overlap(first_scores, per_layer.scores[idx], per_layer.valid, TOP)
            shared = round(overlaps[idx] * top)
            attention.attention_panel(
                axes[1 + i // cols][i % cols], view, per_layer.scores[idx],
                f"({chr(ord('c') + i)}) layer {idx}, cross-attention layer {i + 2} (untrimmed model):\n"
                f"{shared} of its {top} most-attended tokens are also\nthe first layer's {top} most-attended",
            )  # fmt: skip
    return {
        "kept": stats.kept_counts[0],
        "valid": stats.valid_counts[0],
        "full": full_answer,
        "trimmed": trimmed_answer,
        "overlap": overlaps,
    }


def register(subparsers) -> None:
    parser = subparsers.add_parser("viz", help="PNG of cross-attention over the image and the kept tokens")
    options.add_model_arguments(parser)
    parser.add_argument(
        "--image", action="append", metavar="FILE", help="one image file (default: a testbed held-out question)"
    )
    parser.add_argument("--prompt", help="question about --image")
    parser.add_argument("--item", type=int, default=1, help="testbed held-out item index when no --image (default 1)")
    parser.add_argument("--out", default="runs/viz.png", metavar="FILE", help="PNG to write")
    options.add_trim_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = options.trim_config(args)
    if (args.image is None) != (args.prompt is None):
        raise UserError("--image and --prompt go together (or give neither to use a testbed question)")
    if args.image is not None and len(args.image) > 1:
        raise UserError(f"viz draws one image, got {len(args.image)} --image; run it once per image")
    if args.item < 0:
        raise UserError("--item must be >= 0")
    if args.image:
        item = Item("image", (checkpoint.load_image(args.image[0]),), args.prompt, "", "image")
    else:
        item = testbed_data.heldout(1, start=args.item)[0]
    if not str(args.out).lower().endswith(".png"):
        raise UserError(f"--out must name a .png file, got {args.out!r}")
    model, processor, _ = load_model(args.model, args.device, args.dtype)
    warning = prompt_warning(item.prompt) if args.model is None else None
    if warning:
        print(f"crosstrim viz: warning: {warning}", file=sys.stderr)
    shown = figure(item, model, processor, config, Path(args.out))
    print(f"{item.prompt} -> full: {shown['full']!r}, {config.describe()}: {shown['trimmed']!r}")
    print(f"kept {shown['kept']}/{shown['valid']} image tokens; wrote {args.out}")
    return 0
