"""``crosstrim viz``: where the cross-attention layers look and what trimming keeps (the paper's Fig. 4).

One PNG: (a) the first cross-attention layer's attention, summed over heads and over the text rows
that may see the image, laid over the image tiles; (b) the tokens the chosen selection keeps; (c)
the same aggregate for every cross-attention layer of the *untrimmed* model, each titled with how
many of its top tokens the first layer also ranks on top -- the paper's observation that the same
tokens stay important across layers is what makes selecting once, at the first layer, sound.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import crosstrim
from crosstrim.adapters import adapter_for
from crosstrim.adapters.mllama import tokens_per_tile
from crosstrim.cli import options
from crosstrim.cli.options import load_model
from crosstrim.core import TrimConfig
from crosstrim.engine.scores import cross_attention_scores
from crosstrim.engine.stats import FirstLayerScores
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import encode, predict
from crosstrim.testbed import data as testbed_data


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


@dataclass(frozen=True)
class Canvas:
    """The first image as the model saw it (tiles re-assembled), and where each image token lies on it."""

    pixels: np.ndarray  # (H, W, 3) float in [0, 1]
    boxes: dict[int, tuple[int, int, int]]  # token index -> (top, left, size) in pixels
    cls_tokens: tuple[int, ...]
    tile: int  # tile side in pixels, to draw the tile borders


def canvas(model, processor, inputs: dict[str, torch.Tensor]) -> Canvas:
    vision = model.config.vision_config
    ratio_id = int(inputs["aspect_ratio_ids"][0, 0])
    tile_rows, tile_cols = vision.supported_aspect_ratios[ratio_id - 1]
    size, patch = vision.image_size, vision.patch_size
    grid = size // patch
    per_tile = tokens_per_tile(size, patch)
    mean = np.asarray(processor.image_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_processor.image_std, dtype=np.float32)[:, None, None]
    tiles = inputs["pixel_values"][0, 0].float().cpu().numpy() * std + mean
    pixels = np.zeros((tile_rows * size, tile_cols * size, 3), dtype=np.float32)
    boxes, cls_tokens = {}, []
    for tile in range(tile_rows * tile_cols):
        top, left = (tile // tile_cols) * size, (tile % tile_cols) * size
        pixels[top : top + size, left : left + size] = tiles[tile].transpose(1, 2, 0)
        cls_tokens.append(tile * per_tile)
        for p in range(grid * grid):
            boxes[tile * per_tile + 1 + p] = (top + (p // grid) * patch, left + (p % grid) * patch, patch)
    return Canvas(np.clip(pixels, 0, 1), boxes, tuple(cls_tokens), size)


def _heat(ax, view: Canvas, scores: torch.Tensor, title: str) -> None:
    heat = np.zeros(view.pixels.shape[:2], dtype=np.float32)
    for token, (top, left, size) in view.boxes.items():
        heat[top : top + size, left : left + size] = float(scores[token])
    total = float(scores.sum()) or 1.0
    cls_share = sum(float(scores[t]) for t in view.cls_tokens) / total
    ax.imshow(view.pixels, interpolation="nearest")
    ax.imshow(heat, cmap="magma", alpha=0.55, interpolation="nearest", vmin=0, vmax=float(heat.max()) or 1.0)
    ax.set_title(f"{title}\n(CLS tokens: {cls_share:.0%} of attention)", fontsize=8)
    _tile_borders(ax, view)


def _tile_borders(ax, view: Canvas) -> None:
    height, width = view.pixels.shape[:2]
    for x in range(view.tile, width, view.tile):
        ax.axvline(x - 0.5, color="white", linewidth=1.2)
    for y in range(view.tile, height, view.tile):
        ax.axhline(y - 0.5, color="white", linewidth=1.2)
    ax.axis("off")


def overlap(first: torch.Tensor, other: torch.Tensor, valid: torch.Tensor, fraction: float = 0.25) -> float:
    """Share of ``other``'s top ``fraction`` valid tokens that are also among ``first``'s top ones."""
    count = max(1, math.ceil(fraction * int(valid.sum())))
    top = {int(i) for i in torch.topk(first.masked_fill(~valid, -1), count).indices}
    return len(top & {int(i) for i in torch.topk(other.masked_fill(~valid, -1), count).indices}) / count


def figure(item: Item, model, processor, config: TrimConfig, path: Path) -> dict:
    """Draw the three panels for ``item`` and save them to ``path``; returns what the figure shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    inputs = dict(encode(processor, [item], model.device))
    with crosstrim.trimmed(model, config) as handle, torch.no_grad():
        handle.record_scores = True
        model(**inputs, use_cache=False)
    stats = handle.stats
    attention = cross_attention(model, inputs, handle.scores)
    view = canvas(model, processor, inputs)
    kept = {int(i) for i in stats.kept_indices[0]}
    full_answer = predict(model, processor, [item], None)[0].text
    trimmed_answer = predict(model, processor, [item], config)[0].text

    layers = attention.layers
    cols = max(2, min(len(layers), 4))
    rows = 1 + math.ceil(len(layers) / cols)
    height, width = view.pixels.shape[:2]
    scale = 3.2 / max(height, width) * max(1.0, width / height)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * max(2.2, 3.2 * height / width / scale * scale)))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    first = attention.scores[layers[0]]
    _heat(axes[0][0], view, first, f"(a) layer {layers[0]} (first cross-attn): attention")
    ax = axes[0][1]
    ax.imshow(view.pixels * 0.3 + 0.7 * 0.15, interpolation="nearest")
    for token, (top, left, size) in view.boxes.items():
        if token in kept:
            ax.imshow(
                view.pixels[top : top + size, left : left + size],
                extent=(left - 0.5, left + size - 0.5, top + size - 0.5, top - 0.5),
                interpolation="nearest",
            )
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, edgecolor="lime", linewidth=0.8))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    _tile_borders(ax, view)
    cls_kept = sum(t in kept for t in view.cls_tokens)
    ax.set_title(
        f"(b) kept by {config.describe()}: {stats.kept_counts[0]}/{stats.valid_counts[0]} tokens"
        f" ({stats.kept_fraction[0]:.0%}, {cls_kept} CLS)",
        fontsize=8,
    )
    if cols > 2:
        per_tile = len(view.boxes) // len(view.cls_tokens) + 1
        counts = [sum(start <= t < start + per_tile for t in kept) for start in view.cls_tokens]
        full_kv, kept_kv = stats.sample_kv_bytes(0)
        lines = [
            f"{len(view.cls_tokens)} tile(s) x {per_tile} tokens (1 CLS + {per_tile - 1} patches)",
            f"kept per tile: {', '.join(map(str, counts))}",
            f"cross-attn KV: {full_kv / 1024:.1f} KiB -> {kept_kv / 1024:.1f} KiB",
            f"(first cross layer keeps all {stats.image_tokens} tokens;",
            f" later layers see {stats.kept_counts[0]})",
        ]
        axes[0][2].text(0.0, 0.5, "\n".join(lines), fontsize=8, va="center", family="monospace")
    overlaps = {}
    for i, idx in enumerate(layers):
        overlaps[idx] = overlap(first, attention.scores[idx], attention.valid)
        _heat(
            axes[1 + i // cols][i % cols],
            view,
            attention.scores[idx],
            f"(c) layer {idx}: top-25% shared with first {overlaps[idx]:.0%}",
        )
    fig.suptitle(
        f"{item.prompt}   answer: {item.answer or '?'}   full: {full_answer!r}   trimmed: {trimmed_answer!r}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
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
    shown = figure(item, model, processor, config, Path(args.out))
    print(f"{item.prompt} -> full: {shown['full']!r}, {config.describe()}: {shown['trimmed']!r}")
    print(f"kept {shown['kept']}/{shown['valid']} image tokens; wrote {args.out}")
    return 0
