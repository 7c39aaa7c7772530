"""``crosstrim.generate``: ``model.generate`` with the prefill run a few samples at a time.

Why: on a padded batch the memory peak of ``model.generate`` is the prefill (vision encoder
activations, every sample's projected image features, the first cross-attention layer's full K/V),
not the KV cache trimming shrinks. Running the prefill ``prefill_batch_size`` samples at a time
and decoding the whole batch from one merged cache lets the batch grow with the cache savings.

How, with transformers' own decoding loop:

1. every micro-batch (a slice along the batch of the already padded inputs, so every slice has
   the same text length ``L`` and image-slot layout) runs one forward prefill of all ``L`` tokens,
   through the trim handle's hooks when the model is trimmed;
2. the micro-batch caches are merged along the batch: self-attention and untrimmed cross layers
   concatenate; trimmed cross layers hold ``K_i`` kept slots per micro-batch and are padded to the
   largest ``K`` with masked slots (between the kept slots and the summary tokens of
   ``summarize_dropped``), exactly the layout a one-shot prefill of the whole batch builds; the
   selections, :class:`~crosstrim.TrimStats` and any recorded first-layer scores are merged the same way;
3. ``generate`` is called with the merged cache and without the image inputs; it sees the
   prompt's last token as not yet cached, and its first forward call is answered with the
   prefill's own logits for that token (see :func:`_prefilled`), so decoding starts exactly where
   a one-shot prefill would have left it.

The shared model is never modified: the first forward is answered by a shallow copy of the model made
for this call (same modules, parameters and hooks; its own ``forward``), on which ``generate`` runs, and
per-call state lives in the call's cache and in the trim handle's thread-local state. Several threads
may call ``crosstrim.generate`` on one model at once; each gets the tokens it would get alone.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from crosstrim.adapters import adapter_for
from crosstrim.core import Selection
from crosstrim.engine.cache import cache_argument
from crosstrim.engine.handle import HANDLE_ATTR, SELECTION_ATTR, TrimHandle
from crosstrim.engine.memory import cross_kv_bytes
from crosstrim.engine.stats import FirstLayerScores, TrimStats

# Inputs that have one row per sample and go into the prefill forward; generate gets the rest.
_PREFILL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
    "position_ids",
)
# Only the prefill reads the images: the decode steps read the cached image K/V.
_IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def generate(model: nn.Module, *, prefill_batch_size: int, **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` with the prefill run ``prefill_batch_size`` samples at a time.

    Returns what ``model.generate`` returns (a tensor of prompt + new tokens, or a
    ``GenerateOutput`` with ``return_dict_in_generate=True``), with or without an active
    :func:`crosstrim.trim` handle, whose ``stats`` then describe the whole batch as a one-shot
    prefill would. Greedy, sampling, beam search and ``num_return_sequences`` run in transformers'
    own loop on the whole batch. ``prefill_batch_size`` counts samples before beam /
    ``num_return_sequences`` expansion. The model is not modified, so several threads may call this
    on one model at once (the handle's ``stats`` are per thread). A ``generation_config`` is read as
    ``generate`` reads it: its unset fields come from ``model.generation_config``.

    Args:
        model: an ``MllamaForConditionalGeneration``, trimmed or not.
        prefill_batch_size: samples per prefill forward (>= 1). A batch no larger, or one
            without ``pixel_values``, goes to ``model.generate`` unchanged.
        **kwargs: the processor's outputs (``input_ids``, ``attention_mask``, ``pixel_values``,
            ``aspect_ratio_ids``, ``aspect_ratio_mask``, ``cross_attention_mask``) and any
            ``generate`` arguments. They may stay on the CPU: each prefill slice moves to the
            model's device when it runs, so the whole batch of images never sits there at once.

    Raises:
        ValueError: for arguments the merged cache cannot serve: a cache passed in, a static
            cache, ``use_cache=False``, assisted decoding, ``inputs_embeds``,
            ``output_attentions`` / ``output_hidden_states`` (the prefill keeps none).
    """
    adapter = adapter_for(model, "crosstrim.generate")
    adapter.check_generation_model(model)
    text = adapter.decoder(model)
    if isinstance(prefill_batch_size, bool) or not isinstance(prefill_batch_size, int):
        raise TypeError(f"prefill_batch_size must be an int, got {type(prefill_batch_size).__name__}")
    if prefill_batch_size < 1:
        raise ValueError(f"prefill_batch_size must be >= 1, got {prefill_batch_size}")
    _check_supported(model, kwargs)
    input_ids = kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("crosstrim.generate needs input_ids, a (batch, length) tensor as the processor returns it")
    batch = input_ids.shape[0]
    if batch <= prefill_batch_size or kwargs.get("pixel_values") is None:
        return model.generate(**_on_device(model, kwargs))
    if kwargs.get("attention_mask") is None:
        raise ValueError("crosstrim.generate needs the attention_mask the processor returns to micro-batch the prefill")
    for name in _PREFILL_INPUTS:
        value = kwargs.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape[0] != batch):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must have one row per sample ({batch}), got {shape}")

    handle: TrimHandle | None = getattr(text, HANDLE_ATTR, None)
    handle = handle if handle is not None and handle.active else None
    layers = adapter.cross_layers(text)
    trimmed = set() if handle is None else set(handle.trimmed_layers)
    merger = _CacheMerger(batch, trimmed)
    parts = []
    for start in range(0, batch, prefill_batch_size):
        rows = {name: kwargs[name][start : start + prefill_batch_size] for name in _PREFILL_INPUTS if name in kwargs}
        part = _prefill(model, handle, rows)
        merger.add(part.cache, start)
        parts.append(dataclasses.replace(part, cache=None))  # its tensors now live in the merged cache
    expand = _expand_size(model, kwargs)
    selections = [part.selection for part in parts]
    cache = merger.finish(selections)
    if selections[0] is not None:  # trimmed (a selection is read only with an active handle)
        merged = Selection.concatenate(selections)
        setattr(cache, SELECTION_ATTR, merged.repeat_interleave(expand))
        handle.record(  # type: ignore[union-attr]
            _merge_stats([part.stats for part in parts], expand, merged.width),
            _merge_scores([part.scores for part in parts], expand),
        )
    if expand > 1:
        for layer in cache.layers:
            layer.keys = layer.keys.repeat_interleave(expand, dim=0)
            layer.values = layer.values.repeat_interleave(expand, dim=0)
    logits = torch.cat([part.logits for part in parts]).repeat_interleave(expand, dim=0)
    first_step = parts[0].output_type(logits=logits, **{cache_argument(model): cache})
    del parts
    decode = _on_device(model, {name: value for name, value in kwargs.items() if name not in _IMAGE_INPUTS})
    decode[cache_argument(model)] = cache
    prefilled = _prefilled(model, cache, [i for i in range(len(cache.layers)) if i not in layers], first_step)
    # generate of the model's class, on the copy: an instance-level generate (a wrapper) would run on the model.
    return type(model).generate(prefilled, **decode)


def _on_device(model: nn.Module, kwargs: dict) -> dict:
    """The model inputs moved to the model's device (the prefill moves its slices itself), so the
    caller may keep a large batch of images on the CPU."""
    return {
        name: value.to(model.device) if name in _PREFILL_INPUTS and isinstance(value, torch.Tensor) else value
        for name, value in kwargs.items()
    }


@dataclasses.dataclass
class _Part:
    """What the prefill of one micro-batch leaves: its cache, selection, stats and last-token logits."""

    cache: Any
    selection: Selection | None
    stats: TrimStats | None
    scores: FirstLayerScores | None  # recorded with TrimHandle.record_scores only
    logits: torch.Tensor
    output_type: type


def _prefill(model: nn.Module, handle: TrimHandle | None, inputs: dict[str, torch.Tensor]) -> _Part:
    """One forward over every prompt token of a micro-batch, as generate's own prefill runs it.

    Inputs move to the model's device here, a slice at a time, so a large batch of images can wait
    on the CPU.
    """
    device = model.device
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if inputs.get("position_ids") is None:
        inputs["position_ids"] = _positions(inputs["attention_mask"])
    with torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1, return_dict=True)
    cache = out[cache_argument(model)]
    return _Part(
        cache=cache,
        selection=getattr(cache, SELECTION_ATTR, None) if handle is not None else None,
        stats=handle.stats if handle is not None else None,
        scores=handle.scores if handle is not None else None,
        logits=out.logits[:, -1:],
        output_type=type(out),
    )


def _prefilled(model: nn.Module, cache: Any, self_layers: list[int], first_step: Any) -> nn.Module:
    """A shallow copy of ``model`` whose ``generate`` starts decoding from a cache that already holds the whole prompt.

    generate needs an uncached prompt token to start from, so the self-attention layers are
    shown to it cropped to ``L - 1`` tokens; its first forward call (that last token) is then
    answered with the prefill's own output -- the last prompt token's logits and the full cache --
    instead of being recomputed. The answer is exactly what a one-shot prefill gives generate
    (a recomputation would differ with ``trim_first_layer_cache``, whose first layer saw every
    image token at prefill but only the kept ones afterwards), and no forward is spent on it.

    The copy shares every module, parameter and hook with ``model`` (``copy.copy`` copies the attribute
    dict, not what it holds); only its own ``forward`` differs, first the answer, then the model's. So
    the shared model is never touched, and concurrent calls each answer their own first step.
    """
    full = {idx: (cache.layers[idx].keys, cache.layers[idx].values) for idx in self_layers}
    for idx, (keys, values) in full.items():
        cache.layers[idx].keys, cache.layers[idx].values = keys[:, :, :-1], values[:, :, :-1]
    prefilled = copy.copy(model)
    forward = model.forward

    @functools.wraps(forward)  # generate inspects the forward signature
    def answer(*args: Any, **kwargs: Any) -> Any:
        prefilled.forward = forward
        for idx, (keys, values) in full.items():
            cache.layers[idx].keys, cache.layers[idx].values = keys, values
        full.clear()
        return first_step

    prefilled.forward = answer
    return prefilled


def _check_supported(model: nn.Module, kwargs: dict) -> None:
    """Refuse the generate arguments a merged, pre-filled dynamic cache cannot serve, naming the fix."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise ValueError(f"crosstrim.generate builds the cache itself from the micro-batched prefill; drop {name}")
    if kwargs.get("inputs") is not None:
        raise ValueError("pass the prompt as input_ids=..., as the processor returns it, not as inputs")
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("crosstrim.generate prefills from input_ids; inputs_embeds is not supported")
    if kwargs.get("assistant_model") is not None or _setting(model, kwargs, "prompt_lookup_num_tokens") is not None:
        raise ValueError("crosstrim.generate does not support assisted decoding (it crops every cache layer)")
    if _setting(model, kwargs, "custom_generate") is not None:
        raise ValueError("crosstrim.generate runs transformers' built-in decoding; custom_generate is not supported")
    implementation = _setting(model, kwargs, "cache_implementation")
    if implementation not in (None, "dynamic"):
        raise ValueError(
            f"crosstrim.generate merges dynamic caches; cache_implementation={implementation!r} is not supported "
            "(drop it to use the default dynamic cache)"
        )
    if _setting(model, kwargs, "use_cache") is False:
        raise ValueError("crosstrim.generate decodes from the prefilled cache; drop use_cache=False")
    for name in ("output_attentions", "output_hidden_states"):
        if _setting(model, kwargs, name):
            raise ValueError(
                f"crosstrim.generate does not support {name}: generate's first step is answered from the "
                "micro-batched prefill, which keeps no attentions / hidden states of the prompt"
            )


def _setting(model: nn.Module, kwargs: dict, name: str) -> Any:
    """A generate setting as generate resolves it: the keyword, else the passed generation config's field
    where it is set, else the model's generation config's.

    A field is unset when it is ``None`` (transformers 5) or the global default (transformers 4, which
    cannot tell an explicit default from an unset field either, and fills it from the model's config too).
    """
    if name in kwargs:
        return kwargs[name]
    from transformers import GenerationConfig

    passed = kwargs.get("generation_config")
    value = getattr(passed, name, None)
    if passed is not None and value is not None and value != getattr(GenerationConfig(), name, None):
        return value
    own = getattr(getattr(model, "generation_config", None), name, None)
    return value if own is None else own


def _expand_size(model: nn.Module, kwargs: dict) -> int:
    """Rows per sample in generate's batch: generate repeats every input this often, but not a cache passed in."""
    beams = _setting(model, kwargs, "num_beams") or 1
    sequences = _setting(model, kwargs, "num_return_sequences") or 1
    return max(int(beams), int(sequences))


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as generate derives them from the attention mask."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class _CacheMerger:
    """Builds the whole batch's cache from the micro-batches' caches as they come, in the first one's object.

    Layers whose width every micro-batch shares (self-attention: the prompt; untrimmed cross layers: every
    image token) are allocated for the whole batch when the first micro-batch arrives and each micro-batch is
    copied into its rows and released at once, so the prefill never holds such a layer twice (concatenating
    at the end would, for a moment, hold the first cross layer's keys of the whole batch twice). Trimmed
    cross layers hold ``K_i`` kept slots in micro-batch ``i`` (then one summary token per image slot with
    ``summarize_dropped``), known only once every micro-batch has selected: they are kept apart and, in
    :meth:`finish`, widened to the largest ``K`` with zero slots after the kept ones
    (:meth:`Selection.widen`) and joined. Those slots are masked (``slot_valid`` False in
    :meth:`Selection.concatenate` of the selections), as the padding slots of a one-shot prefill are.
    """

    def __init__(self, batch: int, trimmed: set[int]) -> None:
        self.batch, self.trimmed = batch, trimmed
        self.cache: Any = None
        self.pieces: dict[tuple[int, str], list[torch.Tensor]] = {}

    def add(self, cache: Any, start: int) -> None:
        """Take micro-batch ``cache``, whose rows start at batch row ``start``."""
        if self.cache is None:
            self.cache = cache
        for idx, layer in enumerate(cache.layers):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                if tensor is None:  # a layer this prefill did not fill (none in Mllama's): nothing to merge
                    continue
                if idx in self.trimmed:
                    self.pieces.setdefault((idx, name), []).append(tensor)
                    continue
                if cache is self.cache:  # the first micro-batch: room for the whole batch
                    merged = tensor.new_empty((self.batch, *tensor.shape[1:]))
                    setattr(self.cache.layers[idx], name, merged)
                getattr(self.cache.layers[idx], name)[start : start + tensor.shape[0]] = tensor
                if cache is not self.cache:
                    setattr(layer, name, None)

    def finish(self, selections: list[Selection | None]) -> Any:
        """The merged cache, its trimmed layers joined (layer by layer, each part released once joined)."""
        width = max(s.kept_slots for s in selections) if selections[0] is not None else 0
        for (idx, name), pieces in self.pieces.items():
            widened = [s.widen(piece, width, dim=2) for piece, s in zip(pieces, selections)]
            pieces.clear()
            setattr(self.cache.layers[idx], name, torch.cat(widened, dim=0))
        self.pieces = {}
        return self.cache


def _merge_stats(parts: list[TrimStats], expand: int, width: int) -> TrimStats:
    """The stats a one-shot prefill of the whole (expanded) batch reports.

    Trimmed layers hold ``width`` slots per row (the merged selection's: the batch's most kept slots, then
    the summary tokens), the untrimmed ones every image token: the bytes the merged cache holds.
    """
    first = parts[0]

    def rows(name: str) -> tuple:
        return tuple(value for part in parts for value in getattr(part, name) for _ in range(expand))

    kept_counts = rows("kept_counts")
    kept_bytes = cross_kv_bytes(
        first.kv_bytes_per_token,
        batch=len(kept_counts),
        cross_layers=first.cross_layers,
        trimmed_layers=first.trimmed_layers,
        full_tokens=first.image_tokens,
        kept_width=width,
    )
    return dataclasses.replace(
        first,
        kept_indices=rows("kept_indices"),
        kept_counts=kept_counts,
        valid_counts=rows("valid_counts"),
        image_counts=rows("image_counts"),
        kv_bytes_full=sum(part.kv_bytes_full for part in parts) * expand,
        kv_bytes_kept=kept_bytes,
    )


def _merge_scores(parts: list[FirstLayerScores | None], expand: int) -> FirstLayerScores | None:
    """The first-layer scores a one-shot prefill of the whole (expanded) batch records (``None`` unrecorded)."""
    if parts[0] is None:
        return None
    scores = torch.cat([part.scores for part in parts]).repeat_interleave(expand, dim=0)  # type: ignore[union-attr]
    valid = torch.cat([part.valid for part in parts]).repeat_interleave(expand, dim=0)  # type: ignore[union-attr]
    return FirstLayerScores(parts[0].layer, scores, valid)


__all__ = ["generate"]
