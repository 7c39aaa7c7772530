"""Shared test helpers: inputs for the tiny model and the *masked reference* the method must match."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from crosstrim import cli

# (height, width) -> tiles with the tiny 32 px processor: 32x32 -> 1 tile, 32x64 -> 2, 64x64 -> 4.
SIZES = {1: (32, 32), 2: (32, 64), 3: (96, 32), 4: (64, 64)}


def image(tiles: int, seed: int) -> Image.Image:
    h, w = SIZES[tiles]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def inputs(processor, samples: list[tuple[list[int], str]], seed: int = 0):
    """``samples``: (tile counts of each image, text with one <|image|> per image)."""
    images = [[image(t, seed + 10 * i + j) for j, t in enumerate(tiles)] for i, (tiles, _) in enumerate(samples)]
    texts = [text for _, text in samples]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, as ``generate`` computes them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def text_model(model):
    return model.model.language_model


@contextlib.contextmanager
def masked_reference(model, kept: tuple[torch.Tensor, ...], tokens: int, *, first_layer_decode: bool = False):
    """Run the *unpatched* model with every dropped image token masked for every text row.

    Later cross-attention layers (and, with ``first_layer_decode``, the first one at decode
    steps) get ``dtype-min`` at dropped tokens, padding tiles included. This is the definition
    trimming must reproduce: same logits, without ever removing a token.
    """
    text = text_model(model)
    layers = sorted(text.config.cross_attention_layers)
    keep = torch.zeros(len(kept), tokens, dtype=torch.bool)
    for b, idx in enumerate(kept):
        keep[b, idx] = True

    def hook(layer, args, kwargs):
        mask = kwargs.get("cross_attention_mask")
        is_prefill = kwargs.get("cross_attention_states") is not None
        if mask is None or (layer.layer_idx == layers[0] and (is_prefill or not first_layer_decode)):
            return None
        drop = ~keep.to(mask.device)[:, None, None, :]
        kwargs = dict(kwargs, cross_attention_mask=mask.masked_fill(drop, torch.finfo(mask.dtype).min))
        return args, kwargs

    with _cross_layer_pre_hooks(text, hook):
        yield


def valid_image_tokens(batch, tokens: int) -> torch.Tensor:
    """``(B, N)``: image tokens of real (non-padding) tiles, from the processor's cross-attention mask."""
    tiles = batch["cross_attention_mask"].bool().any(1)  # (B, images, tiles)
    return tiles.flatten(1).repeat_interleave(tokens // tiles.flatten(1).shape[1], dim=1)


@contextlib.contextmanager
def summary_reference(model, kept: tuple[torch.Tensor, ...], valid: torch.Tensor, images: int):
    """Run the *unpatched* model with every dropped image token replaced by the mean of its image's
    dropped tokens, in the later cross-attention layers only; nothing is removed, padding tiles
    that were not kept are masked. ``summarize_dropped`` must reproduce it: by ToMe's identity, n
    equal tokens attract what one token does with its logit raised by log(n).
    """
    text = text_model(model)
    layers = sorted(text.config.cross_attention_layers)
    tokens = valid.shape[1]
    keep = torch.zeros_like(valid)
    for b, idx in enumerate(kept):
        keep[b, idx] = True
    dropped = (valid & ~keep).view(len(kept), images, -1)

    def hook(layer, args, kwargs):
        if layer.layer_idx == layers[0]:
            return None
        kwargs = dict(kwargs)
        states = kwargs.get("cross_attention_states")
        if states is not None:
            flat = states.reshape(len(kept), images, tokens // images, -1)
            weights = dropped.to(flat.dtype)[..., None]
            means = (flat * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True).clamp(min=1)
            kwargs["cross_attention_states"] = torch.where(dropped[..., None], means, flat).reshape(states.shape)
        mask = kwargs.get("cross_attention_mask")
        if mask is not None:
            unused = ~(keep | valid).to(mask.device)[:, None, None, :]
            kwargs["cross_attention_mask"] = mask.masked_fill(unused, torch.finfo(mask.dtype).min)
        return args, kwargs

    with _cross_layer_pre_hooks(text, hook):
        yield


@contextlib.contextmanager
def _cross_layer_pre_hooks(text, hook):
    """``hook`` as a pre-hook (with kwargs) on every cross-attention layer of ``text``, inside the block."""
    layers = sorted(text.config.cross_attention_layers)
    handles = [text.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_cli(capsys, *argv):
    """Run ``crosstrim ARGV`` in-process; return (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# The testbed checkpoint shipped in the package loads on transformers 5 only (its tokenizer files are in
# the transformers 5 format); tests that run it skip in the oldest-supported (4.57) environment.
needs_testbed_checkpoint = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="the shipped testbed checkpoint's tokenizer files are in the transformers 5 format",
)


# generate modes beyond greedy that trimming must serve as transformers does (pytest parameters and ids).
GENERATE_MODES = [
    {"do_sample": True, "top_k": 0, "temperature": 1.0},
    {"num_beams": 3, "do_sample": False},
    {"do_sample": True, "num_return_sequences": 2},
    {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
]
GENERATE_MODE_IDS = ["sampling", "beam", "sampling-n2", "beam-n2"]
