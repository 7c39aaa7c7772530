"""The engine's cache helpers, for every model family: the one place the cache argument's name is resolved
(``cache`` from transformers 5.24 on, ``past_key_values`` before), cached keys and values read back, and
caches crosstrim cannot shrink refused."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosstrim.adapters import drift, parameters

CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_of(kwargs: dict) -> Any:
    """The cache a layer or model call received: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_argument(model: nn.Module) -> str:
    """The name ``model``'s forward (and so ``generate``) takes a cache under: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before."""
    return "cache" if "cache" in parameters(type(model).forward) else "past_key_values"


def cached_kv(cache: Any, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``idx``'s cached keys and values, read the way transformers' own decode step reads them."""
    try:
        layer = cache.layers[idx]
        keys, values = layer.keys, layer.values
    except (AttributeError, IndexError, TypeError) as error:
        raise drift(f"the cache ({type(cache).__name__}) has no `layers[{idx}].keys/values` ({error})") from None
    if keys is None or values is None:
        raise drift(f"the cache's layer {idx} holds nothing after prefill")
    return keys, values


def check_cache(cache: Any, layers: list[int]) -> None:
    if cache is None or not hasattr(cache, "layers"):
        return
    from transformers.cache_utils import DynamicLayer

    for idx in layers:
        if idx < len(cache.layers) and not isinstance(cache.layers[idx], DynamicLayer):
            raise ValueError(
                f"crosstrim shrinks the cross-attention KV cache, but layer {idx} uses "
                f"{type(cache.layers[idx]).__name__}, which is pre-allocated at full size; use the "
                "default dynamic cache (drop cache_implementation='static' / 'offloaded_static')"
            )


__all__ = ["CACHE_ARGUMENTS", "cache_argument", "cache_of", "cached_kv", "check_cache"]
