"""The attention every cross-attention layer of the untrimmed model gives the image tokens, for diagnostics.

The trim handle scores the first cross layer only (what the method selects from, ``handle.scores``).
Pictures of how attention spreads over the later layers need theirs too: here every listed layer's queries
and keys are captured at the points the model's adapter names, in one untrimmed forward, and scored with
the core's :func:`~crosstrim.core.attention_scores` over the same scoring rows.
"""

from __future__ import annotations

import torch
from torch import nn

from crosstrim import core
from crosstrim.adapters import adapter_for


def cross_attention_scores(model: nn.Module, inputs: dict, layers: list[int]) -> dict[int, torch.Tensor]:
    """``layer -> (B, H, N)`` per-head attention scores of the cross-attention ``layers`` in one untrimmed
    forward of ``inputs`` (the model's first cross layer may be among them)."""
    adapter = adapter_for(model)
    text = adapter.decoder(model)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    masks: dict[str, torch.Tensor | None] = {}

    def keep(key):
        return lambda module, args, output: captured.__setitem__(key, output.detach())

    def note_masks(module, args, kwargs):
        masks["cross"] = kwargs.get("cross_attention_mask")
        masks["rows"] = kwargs.get("full_text_row_masked_out_mask")

    hooks = [text.layers[layers[0]].register_forward_pre_hook(note_masks, with_kwargs=True)]
    for idx in layers:
        query, key = adapter.capture_points(text, idx)
        hooks += [query.register_forward_hook(keep((idx, "q"))), key.register_forward_hook(keep((idx, "k")))]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    mask = masks["cross"]
    query = captured[(layers[0], "q")]
    rows = core.scoring_rows(masks["rows"], inputs.get("attention_mask"), query.shape[0], query.shape[2], mask.device)
    return {
        idx: core.attention_scores(captured[(idx, "q")], captured[(idx, "k")], mask, rows, adapter.scaling(text, idx))
        for idx in layers
    }


__all__ = ["cross_attention_scores"]
