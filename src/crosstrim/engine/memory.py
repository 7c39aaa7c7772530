"""The analytic KV-cache model of Llama-3.2-Vision (Mllama), from its config alone (paper Fig. 3).

Nothing here builds a model: every count comes from a ``MllamaConfig`` (or its ``config.json``
as a dict), so the same numbers hold for a local checkpoint, the ``11b``/``90b`` presets built
from the published configs, and the small models the tests run.

What the cache holds, per sample, in transformers' ``DynamicCache``:

* every self-attention layer: keys + values of every text token,
  ``2 * kv_heads * head_dim * element_size`` bytes per token and layer;
* every cross-attention layer: keys + values of every image token, ``n_images * max_tiles *
  tokens_per_tile`` of them (padding tiles included), with ``tokens_per_tile =
  (image_size // patch_size) ** 2 + 1``. After trimming, the later cross layers (and the first,
  with ``trim_first_layer_cache``) hold only the kept tokens: ``ceil(r * valid)`` per image for
  an exact kept fraction ``r`` (``TrimConfig(keep_ratio=r)``), padded to the batch's largest count.

A decode step reads the weights once and every sample's cache once, so the bytes it moves are
``W + B * (S + C)``; trimming replaces ``C`` by the kept cross KV. :meth:`MemoryModel.decode_ratio`
is that prediction for a trimmed/full step-time ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosstrim.adapters.mllama import tokens_per_tile
from crosstrim.core.methods import kept_tokens

# Every dtype name crosstrim accepts (case-insensitive), for model loading and byte counts alike.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float": torch.float32,
    "half": torch.float16,
    "float8": torch.float8_e4m3fn,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
}
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def element_size(dtype: str | torch.dtype | int) -> int:
    """Bytes per element of ``dtype`` (a ``torch.dtype``, a name such as ``"bf16"``, or a byte count)."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_BYTES:
        return DTYPE_BYTES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")


def trimmed_cross_layers(cross_layers: Sequence[int], trim_first_layer_cache: bool) -> tuple[int, ...]:
    """The cross layers whose cache holds only kept tokens: every one but the first, which scores with all of
    them, unless ``trim_first_layer_cache`` (the one definition of which layers are trimmed)."""
    layers = tuple(sorted(cross_layers))
    return layers if trim_first_layer_cache else layers[1:]


def layer_kv_bytes(batch: int, tokens: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of keys plus values one attention layer caches for ``tokens`` per sample."""
    return 2 * batch * tokens * kv_heads * head_dim * element_size


def cross_kv_bytes(
    per_token: int, *, batch: int, cross_layers: int, trimmed_layers: int, full_tokens: int, kept_width: int | None
) -> int:
    """Cross-attention KV bytes ``batch`` samples hold: untrimmed layers ``full_tokens`` each, trimmed layers
    ``kept_width`` (``None``: untrimmed). ``per_token`` is :func:`layer_kv_bytes` of one token; the one
    formula behind the memory model, :class:`~crosstrim.TrimStats` and the merged stats of generate."""
    width = full_tokens if kept_width is None else kept_width
    return batch * ((cross_layers - trimmed_layers) * full_tokens + trimmed_layers * width) * per_token


@dataclass(frozen=True)
class KVBytes:
    """Bytes of self-attention and cross-attention KV cache."""

    self_attn: int
    cross_attn: int

    @property
    def total(self) -> int:
        return self.self_attn + self.cross_attn


def _get(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


@dataclass(frozen=True)
class MemoryModel:
    """Cache and weight bytes of one Mllama architecture. Build it with :meth:`from_config`."""

    name: str
    layers: int
    cross_layers: tuple[int, ...]
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    image_size: int
    patch_size: int
    max_tiles: int

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> MemoryModel:
        """From a ``MllamaConfig`` or its ``config.json`` dict (``text_config`` + ``vision_config``)."""
        text, vision = _get(config, "text_config"), _get(config, "vision_config")
        if text is None or vision is None:
            raise ValueError("an Mllama config needs both text_config and vision_config")
        cross = _get(text, "cross_attention_layers")
        if cross is None:  # transformers' default, as MllamaTextConfig fills it in
            cross = [3, 8, 13, 18, 23, 28, 33, 38]
        return cls(
            name=name,
            layers=int(_get(text, "num_hidden_layers")),
            cross_layers=tuple(sorted(int(i) for i in cross)),
            hidden=int(_get(text, "hidden_size")),
            heads=int(_get(text, "num_attention_heads")),
            kv_heads=int(_get(text, "num_key_value_heads")),
            intermediate=int(_get(text, "intermediate_size")),
            vocab=int(_get(text, "vocab_size")),
            image_size=int(_get(vision, "image_size")),
            patch_size=int(_get(vision, "patch_size")),
            max_tiles=int(_get(vision, "max_num_tiles")),
        )

    # -- shapes ----------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_cross(self) -> int:
        return len(self.cross_layers)

    @property
    def n_self(self) -> int:
        return self.layers - self.n_cross

    @property
    def tokens_per_tile(self) -> int:
        """Patches of one tile plus its CLS token (1601 for 560 px / patch 14)."""
        return tokens_per_tile(self.image_size, self.patch_size)

    @property
    def image_tokens(self) -> int:
        """Image tokens one image slot occupies in the cross-attention cache (all tiles, padding included)."""
        return self.max_tiles * self.tokens_per_tile

    def trimmed_layers(self, trim_first_layer_cache: bool = False) -> int:
        """Cross layers whose cache holds only kept tokens (the first one scores with all of them)."""
        return len(trimmed_cross_layers(self.cross_layers, trim_first_layer_cache))

    # -- KV cache --------------------------------------------------------------------------------

    def kv_bytes_per_token(self, dtype: str | torch.dtype | int) -> int:
        """Keys + values of one token in one attention layer."""
        return layer_kv_bytes(1, 1, self.kv_heads, self.head_dim, element_size(dtype))

    def self_kv_bytes(self, text_tokens: int, dtype: str | torch.dtype | int, batch: int = 1) -> int:
        """Self-attention KV of ``batch`` samples of ``text_tokens`` (padding included) over all self layers."""
        return batch * text_tokens * self.n_self * self.kv_bytes_per_token(dtype)

    def cross_kv_bytes_held(
        self,
        dtype: str | torch.dtype | int,
        *,
        batch: int,
        full_tokens: int,
        kept_width: int | None = None,
        trim_first_layer_cache: bool = False,
    ) -> int:
        """Cross KV a batch holds: untrimmed layers ``full_tokens`` per sample, trimmed ones ``kept_width``.

        ``kept_width`` is the batch's largest kept count (shorter samples are padded to it);
        ``None`` means untrimmed.
        """
        return cross_kv_bytes(
            self.kv_bytes_per_token(dtype),
            batch=batch,
            cross_layers=self.n_cross,
            trimmed_layers=self.trimmed_layers(trim_first_layer_cache),
            full_tokens=full_tokens,
            kept_width=kept_width,
        )

    def cross_kv_bytes(
        self,
        dtype: str | torch.dtype | int,
        *,
        batch: int = 1,
        images: int = 1,
        r: float = 1.0,
        tiles: int | None = None,
        trim_first_layer_cache: bool = False,
    ) -> int:
        """Cross KV of ``batch`` samples with ``images`` images of ``tiles`` tiles each, kept fraction ``r``.

        ``r == 1`` is untrimmed (every slot, padding tiles too). Otherwise each image keeps
        ``ceil(r * tiles * tokens_per_tile)`` tokens, as ``TrimConfig(keep_ratio=r)`` does.
        """
        full = images * self.image_tokens
        if r == 1.0:
            return self.cross_kv_bytes_held(dtype, batch=batch, full_tokens=full)
        valid = (self.max_tiles if tiles is None else tiles) * self.tokens_per_tile
        kept = images * kept_tokens(valid, r)
        return self.cross_kv_bytes_held(
            dtype, batch=batch, full_tokens=full, kept_width=kept, trim_first_layer_cache=trim_first_layer_cache
        )

    def kv_bytes(
        self,
        dtype: str | torch.dtype | int,
        *,
        batch: int = 1,
        text_tokens: int = 0,
        images: int = 1,
        r: float = 1.0,
        tiles: int | None = None,
        trim_first_layer_cache: bool = False,
    ) -> KVBytes:
        """Self- and cross-attention KV of a batch of equal samples (no text padding)."""
        return KVBytes(
            self.self_kv_bytes(text_tokens, dtype, batch),
            self.cross_kv_bytes(
                dtype, batch=batch, images=images, r=r, tiles=tiles, trim_first_layer_cache=trim_first_layer_cache
            ),
        )

    def crossover_tokens(
        self, dtype: str | torch.dtype | int = "bf16", *, images: int = 1, r: float = 1.0, **kwargs: bool
    ) -> float:
        """Text length at which self-attention KV equals cross-attention KV (it exceeds it beyond)."""
        if self.n_self == 0:
            return math.inf
        cross = self.cross_kv_bytes(dtype, images=images, r=r, **kwargs)
        return cross / (self.n_self * self.kv_bytes_per_token(dtype))

    # -- weights and bytes moved per decode step -------------------------------------------------

    def decode_weight_params(self) -> int:
        """Parameters one decode step reads: every text layer (cross layers without ``k_proj``/``v_proj``,
        whose output is cached), the final norm and the LM head. The embedding table is not counted (a
        step reads ``B`` rows of it) and neither is the vision encoder (not run while decoding)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp = 3 * h * self.intermediate
        self_layer = h * q + 2 * h * kv + q * h + mlp + 2 * h
        cross_layer = h * q + q * h + mlp + 2 * h + 2 * self.head_dim + 2
        return self.n_self * self_layer + self.n_cross * cross_layer + h + self.vocab * h

    def decode_weight_bytes(self, dtype: str | torch.dtype | int) -> int:
        return self.decode_weight_params() * element_size(dtype)

    def decode_bytes(
        self,
        dtype: str | torch.dtype | int,
        *,
        batch: int,
        text_tokens: int,
        images: int = 1,
        r: float = 1.0,
        tiles: int | None = None,
        trim_first_layer_cache: bool = False,
    ) -> int:
        """Bytes one decode step moves: ``W + B * (S + C)`` (``C`` trimmed to ``r``)."""
        kv = self.kv_bytes(
            dtype,
            batch=batch,
            text_tokens=text_tokens,
            images=images,
            r=r,
            tiles=tiles,
            trim_first_layer_cache=trim_first_layer_cache,
        )
        return self.decode_weight_bytes(dtype) + kv.total

    def decode_ratio(
        self,
        dtype: str | torch.dtype | int,
        *,
        batch: int,
        text_tokens: int,
        r: float,
        images: int = 1,
        tiles: int | None = None,
        trim_first_layer_cache: bool = False,
    ) -> float:
        """Predicted trimmed/full decode-step time if a step costs the bytes it moves:
        ``(W + B(S + C_r)) / (W + B(S + C))``. ``C_r`` is ``r * C`` when every cross layer is trimmed
        (``trim_first_layer_cache``); by default the first layer keeps all its tokens."""
        common = {"batch": batch, "text_tokens": text_tokens, "images": images, "tiles": tiles}
        trimmed = self.decode_bytes(dtype, r=r, trim_first_layer_cache=trim_first_layer_cache, **common)
        return trimmed / self.decode_bytes(dtype, **common)

    def largest_batch(
        self,
        budget_bytes: float,
        dtype: str | torch.dtype | int,
        *,
        text_tokens: int,
        fixed_bytes: float,
        r: float = 1.0,
        images: int = 1,
        trim_first_layer_cache: bool = False,
    ) -> int:
        """Largest batch whose ``fixed_bytes`` (weights) plus KV cache fits ``budget_bytes`` (0 if none)."""
        per_sample = self.kv_bytes(
            dtype, text_tokens=text_tokens, images=images, r=r, trim_first_layer_cache=trim_first_layer_cache
        ).total
        return max(0, math.floor((budget_bytes - fixed_bytes) / per_sample))


def held_kv_bytes(cache, cross_layers) -> KVBytes:
    """Self- and cross-attention bytes a transformers ``DynamicCache`` actually holds (its key and value
    tensors, layer by layer): what :meth:`MemoryModel.kv_bytes` predicts, measured."""
    sizes = [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]
    cross = sum(sizes[i] for i in cross_layers)
    return KVBytes(sum(sizes) - cross, cross)


# -- presets, from the published config.json files of meta-llama/Llama-3.2-{11B,90B}-Vision ----------

_VISION = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "attention_heads": 16,
    "intermediate_size": 5120,
    "vision_output_dim": 7680,
    "image_size": 560,
    "patch_size": 14,
    "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
}
_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_TEXT = {
    "11b": {"hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32, "intermediate_size": 14336},
    "90b": {"hidden_size": 8192, "num_hidden_layers": 100, "num_attention_heads": 64, "intermediate_size": 28672},
}
PRESETS = tuple(_TEXT)


def preset_config(name: str):
    """``MllamaConfig`` of Llama-3.2-11B-Vision or -90B-Vision (``"11b"``/``"90b"``), without weights."""
    from transformers import MllamaConfig

    key = name.lower()
    if key not in _TEXT:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = dict(_TEXT[key])
    layers = text["num_hidden_layers"]
    text.update(
        vocab_size=128256,
        num_key_value_heads=8,
        cross_attention_layers=list(range(3, layers, 5)),  # 3, 8, ..., every fifth layer
        rope_scaling=dict(_ROPE),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128004,
    )
    return MllamaConfig(text_config=text, vision_config=dict(_VISION), image_token_index=128256)


def preset(name: str) -> MemoryModel:
    """The :class:`MemoryModel` of a preset (``"11b"`` or ``"90b"``)."""
    return MemoryModel.from_config(preset_config(name), name=name.lower())


__all__ = [
    "DTYPES",
    "DTYPE_BYTES",
    "PRESETS",
    "KVBytes",
    "MemoryModel",
    "cross_kv_bytes",
    "element_size",
    "held_kv_bytes",
    "kept_tokens",
    "layer_kv_bytes",
    "trimmed_cross_layers",
    "preset",
    "preset_config",
]
