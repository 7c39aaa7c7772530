"""The image as the model saw it, with where a cross-attention layer looks and which tokens trimming kept.

Shared by ``crosstrim viz`` and ``crosstrim demo``. The overlays never recolour the image: the question is
usually about colours (a blue square must stay blue). Attention *dims* the tokens a layer barely attends (a
spotlight, one hue: black), with a colour scale in percent of the layer's attention; trimming outlines what it
kept and covers what it dropped, with a legend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, PowerNorm
from matplotlib.patches import Patch, Rectangle

import crosstrim
from crosstrim.adapters.mllama import tokens_per_tile
from crosstrim.core import TrimConfig
from crosstrim.engine.stats import FirstLayerScores, TrimStats

DIM = 0.7  # opacity of black over a token the layer gives no attention: clearly darker, hue still readable
KEPT = "#00a0ff"  # outline of kept tokens: a hue no testbed object has
DROPPED = 0.6  # opacity of black over a dropped token
SUMMARY = "#ff8c00"  # hatching of dropped tokens that summarize_dropped averages into one token


@dataclass(frozen=True)
class Canvas:
    """The first image as the model saw it (tiles re-assembled), and where each image token lies on it."""

    pixels: np.ndarray  # (H, W, 3) float in [0, 1]
    boxes: dict[int, tuple[int, int, int]]  # token index -> (top, left, size) in pixels
    cls_tokens: tuple[int, ...]
    tile: int  # tile side in pixels, to draw the tile borders


def canvas(model, processor, inputs: dict[str, torch.Tensor]) -> Canvas:
    """Sample 0's first image from ``pixel_values`` (normalisation undone), tiles placed by its aspect ratio."""
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


def record(model, inputs: dict[str, torch.Tensor], config: TrimConfig) -> tuple[FirstLayerScores, TrimStats]:
    """One prefill trimmed by ``config``, keeping what the first cross-attention layer scored: what is drawn."""
    with crosstrim.trimmed(model, config) as handle, torch.no_grad():
        handle.record_scores = True
        model(**inputs, use_cache=False)
    return handle.scores, handle.stats


def _cls_share(view: Canvas, scores: torch.Tensor) -> float:
    """Share of the attention that goes to the tiles' CLS tokens, which have no place on the image."""
    return sum(float(scores[t]) for t in view.cls_tokens) / (float(scores.sum()) or 1.0)


def attention_panel(ax: Axes, view: Canvas, scores: torch.Tensor, title: str) -> None:
    """The image with every token dimmed by how little of the layer's attention it gets, and a colour scale.

    ``scores`` is ``(N,)``: attention summed over heads and text rows. Each patch shows its share of the total
    (CLS tokens included); the most-attended patch is left as it is, a patch with none is covered by black at
    opacity :data:`DIM`, on a square-root scale.
    """
    shares = scores.float() / (float(scores.sum()) or 1.0) * 100
    # Square-root scale: a token with half the top share is dimmed little (its colour stays readable), while
    # the background, a few percent of the top, is still clearly darker.
    norm = PowerNorm(0.5, vmin=0, vmax=max(float(shares[token]) for token in view.boxes) or 1.0)
    shade = np.zeros((*view.pixels.shape[:2], 4), dtype=np.float32)
    for token, (row, col, size) in view.boxes.items():
        shade[row : row + size, col : col + size, 3] = DIM * (1 - float(norm(float(shares[token]))))
    ax.imshow(view.pixels)
    ax.imshow(shade)
    _tile_borders(ax, view)
    # The scale shows what a white pixel looks like under each share, so it reads like the image.
    scale = LinearSegmentedColormap.from_list("dim", [(1 - DIM,) * 3, (1.0, 1.0, 1.0)])
    bar = ax.figure.colorbar(ScalarMappable(norm, scale), ax=ax, fraction=0.05, pad=0.02, shrink=0.9)
    bar.set_label("% of the layer's attention per token\n(darker: less)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(f"{title}\nCLS tokens (not drawn): {_cls_share(view, scores):.0%}", fontsize=8)


def kept_panel(ax: Axes, view: Canvas, kept: set[int], *, summarized: bool, title: str) -> None:
    """The image with kept tokens outlined and dropped ones covered; with ``summarized`` the dropped ones are
    also hatched, as later layers still see them averaged into one summary token."""
    ax.imshow(view.pixels)
    dropped = [box for token, box in view.boxes.items() if token not in kept]
    for row, col, size in dropped:
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), size, size, color="black", alpha=DROPPED, linewidth=0))
        if summarized:
            ax.add_patch(
                Rectangle((col - 0.5, row - 0.5), size, size, fill=False, hatch="///", edgecolor=SUMMARY, linewidth=0)
            )
    for token, (row, col, size) in view.boxes.items():
        if token in kept:
            ax.add_patch(Rectangle((col, row), size - 1, size - 1, fill=False, edgecolor=KEPT, linewidth=1.6))
    _tile_borders(ax, view)
    cls_kept = sum(token in kept for token in view.cls_tokens)
    patches = sum(token in kept for token in view.boxes)
    legend = [
        Patch(facecolor="none", edgecolor=KEPT, linewidth=1.6, label=f"kept: {patches} patches (+{cls_kept} CLS)"),
        Patch(
            facecolor=(0, 0, 0, DROPPED),
            edgecolor=SUMMARY if summarized else "none",
            hatch="///" if summarized else None,
            label=f"dropped: {len(dropped)} patches"
            + (", averaged into 1 summary token" if summarized else ", unseen by later layers"),
        ),
    ]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, frameon=False)
    ax.set_title(title, fontsize=8)


def _tile_borders(ax: Axes, view: Canvas) -> None:
    height, width = view.pixels.shape[:2]
    for x in range(view.tile, width, view.tile):
        ax.axvline(x - 0.5, color="white", linewidth=1.5)
    for y in range(view.tile, height, view.tile):
        ax.axhline(y - 0.5, color="white", linewidth=1.5)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
