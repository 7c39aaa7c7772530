"""One request's selection at its prefill, on plain tensors, with :mod:`crosstrim.core`. No vLLM import.

vLLM hands the model a flat batch of text rows (``T`` tokens of all requests) and one encoder output per
image. For a request with an image this module rebuilds what transformers' Mllama sees for a batch of
one (the additive cross-attention mask, the scoring rows) and asks :mod:`crosstrim.core` what to keep,
so the kept tokens are those ``crosstrim.trim(model, TrimConfig(keep_ratio=r, trim_first_layer_cache=True))``
keeps for the same prompt and image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crosstrim import core
from crosstrim.core import TrimConfig


def cross_mask(valid: torch.Tensor, after_image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``(1, 1, L, N)`` transformers builds for one image: rows from ``<|image|>`` on may
    attend its valid tokens; earlier rows get an all-zero row (they attend every token, padding tiles too)."""
    allowed = valid[None, :] | ~after_image[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def scores(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, after_image: torch.Tensor, scaling: float, chunk: int
) -> torch.Tensor:
    """Per-head attention ``(1, H, N)`` the first cross layer gives each image token from the prompt's rows.

    Args:
        query: ``(L, H, d)`` the prompt's queries after ``q_norm``.
        key: ``(G, N, d)`` the image's keys after ``k_norm``, padding tiles included.
        valid: ``(N,)`` bool, tokens of real tiles.
        after_image: ``(L,)`` bool, rows from ``<|image|>`` on (the rows that score).
    """
    mask = cross_mask(valid, after_image, query.dtype)
    return core.attention_scores(query.transpose(0, 1)[None], key[None], mask, after_image[None], scaling, chunk)


def keep_indices(
    config: TrimConfig, head_scores: torch.Tensor | None, valid: torch.Tensor, prompt_ids: Sequence[int]
) -> torch.Tensor:
    """Ascending token indices ``(K,)`` of one image that every cross layer caches.

    ``head_scores`` is ``(1, H, N)`` over all heads (``None`` for methods that need none). A method that
    needs seeds (the random baseline) gets one from the prompt's token ids and the image layout, as the
    transformers path derives it for a sample with one image, so both draw the same tokens.
    """
    seeds = core.sample_seeds(config.seed, prompt_ids, valid[None].cpu()) if config.needs_seeds else None
    keep = core.select(config, head_scores, valid[None], seeds)[0]
    return keep.nonzero().flatten()
