"""What crosstrim reads from transformers' Mllama, and the checks that refuse a release which moved it.

crosstrim hooks into a stock model, so a transformers release that renames an argument, an attribute or
the cache layout would otherwise leave it running untrimmed without a word. Everything the hooks in
:mod:`crosstrim.mllama` read is looked up here, and a mismatch is an error naming the version.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def drift(detail: str) -> RuntimeError:
    """The error for a transformers Mllama that no longer looks the way crosstrim hooks into it."""
    import transformers

    return RuntimeError(
        f"crosstrim cannot trim this Mllama model under transformers {transformers.__version__}: {detail}. "
        "crosstrim is tested with transformers 4.57.3 and 5.24.0 (README, 'Supported versions') and refuses "
        "to run rather than run untrimmed; use a tested version or report the change"
    )


def parameters(function: Any) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def check_layout(text: nn.Module, layers: list[int]) -> None:
    """Refuse a model whose hook points, attributes or arguments are not the ones crosstrim reads."""
    blocks = getattr(text, "layers", None)
    if blocks is None or len(blocks) <= layers[-1]:
        raise drift(f"the text decoder has no `layers[{layers[-1]}]` although the config lists it as cross-attention")
    calls = [("the text decoder", text, {"input_ids", "attention_mask", "cross_attention_states"})]
    wanted = {"hidden_states", "cross_attention_states", "cross_attention_mask", "full_text_row_masked_out_mask"}
    calls += [(f"cross-attention layer {idx}", blocks[idx], wanted) for idx in layers]
    for where, module, names in calls:
        accepted = parameters(module.forward)
        missing = sorted(names - accepted)
        if missing:
            raise drift(f"{where}'s forward no longer takes {', '.join(missing)}")
        if not accepted & {"cache", "past_key_values"}:
            raise drift(f"{where}'s forward takes neither `cache` nor `past_key_values`")
    attn = getattr(blocks[layers[0]], "cross_attn", None)
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attn, name, None), nn.Module):
            raise drift(f"the first cross-attention layer has no `cross_attn.{name}` module to capture")
    if not isinstance(getattr(attn, "scaling", None), (int, float)):
        raise drift("the first cross-attention layer has no numeric `cross_attn.scaling`")


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


def text_model(model: nn.Module) -> nn.Module:
    from transformers.models.mllama.modeling_mllama import MllamaTextModel

    if isinstance(model, MllamaTextModel):
        raise TypeError(
            "crosstrim.trim needs the whole vision-language model (MllamaForConditionalGeneration "
            "or MllamaModel), not its text decoder alone"
        )
    found = [m for m in model.modules() if isinstance(m, MllamaTextModel)]
    if len(found) != 1 or getattr(getattr(model, "config", None), "vision_config", None) is None:
        raise TypeError(
            f"crosstrim.trim supports transformers Mllama models (Llama-3.2-Vision, "
            f"MllamaForConditionalGeneration); got {type(model).__name__}"
        )
    return found[0]


def cache_of(kwargs: dict) -> Any:
    """The cache a layer or model call received: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def check_cache(cache: Any, layers: list[int], trimmed: list[int], static_refusal: str | None) -> None:
    """Refuse cache layers crosstrim cannot shrink: only dynamic layers, and static layers where
    ``static_refusal`` is ``None`` (a fixed budget: re-sized to its width before the prefill fills them);
    else ``static_refusal`` says why not."""
    if cache is None or not hasattr(cache, "layers"):
        return
    from transformers.cache_utils import DynamicLayer, StaticLayer

    for idx in layers:
        if idx >= len(cache.layers) or isinstance(cache.layers[idx], DynamicLayer):
            continue
        kind = type(cache.layers[idx]).__name__
        if type(cache.layers[idx]) is StaticLayer and (idx not in trimmed or static_refusal is None):
            continue
        if type(cache.layers[idx]) is StaticLayer:
            raise ValueError(
                f"crosstrim shrinks the cross-attention KV cache, but layer {idx} uses {kind}, pre-allocated at a "
                f"fixed size, and {static_refusal}. Use keep_ratio (a fixed budget: the static cache is allocated "
                "at its width) or the default dynamic cache (drop cache_implementation='static')"
            )
        raise ValueError(
            f"crosstrim shrinks the cross-attention KV cache, but layer {idx} uses {kind}, which it cannot "
            "re-size; use the default dynamic cache, or cache_implementation='static' with keep_ratio"
        )


__all__ = ["cache_of", "cached_kv", "check_cache", "check_layout", "drift", "parameters", "text_model"]
