"""What the vLLM model reads from the checkpoint config, and the slot arithmetic that follows. No vLLM import.

vLLM allocates every request's cross-attention KV slots *before* prefill, from the placeholder count the
multimodal processor gives, and every cross-attention layer of a request shares that one count. So the
only trimming that fits is a budget fixed by the image alone (``keep_ratio``), applied to every cross
layer including the first (crosstrim's ``trim_first_layer_cache=True``). The model later learns each
image's tile count from its slot count (:func:`valid_tiles`), which is why a budget must map tile counts
to distinct slot counts.
"""

from __future__ import annotations

from collections.abc import Mapping

from crosstrim.core import TrimConfig, kept_tokens

CONFIG_KEY = "crosstrim"
# Options a vLLM config may set; the rest of TrimConfig is fixed by how vLLM allocates slots.
OPTIONS = ("method", "keep_ratio", "seed", "score_chunk_elements")


def trim_config(hf_config: object) -> TrimConfig | None:
    """The :class:`TrimConfig` the checkpoint config's ``crosstrim`` key asks for; ``None`` serves untrimmed.

    Set it with ``--hf-overrides '{"crosstrim": {"keep_ratio": 0.25}}'`` (``LLM(..., hf_overrides=...)``).
    ``keep_ratio`` 1.0 is the plain model too.

    Raises:
        ValueError: for ``k_ratio`` (an adaptive count cannot fit slots allocated before prefill), for
            options vLLM cannot honour, and for anything :class:`TrimConfig` refuses.
    """
    options = getattr(hf_config, CONFIG_KEY, None)
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ValueError(f'the "{CONFIG_KEY}" config key must be a JSON object such as {{"keep_ratio": 0.25}}')
    options = dict(options)
    if "k_ratio" in options:
        raise ValueError(
            "k_ratio keeps an input-dependent number of image tokens, but vLLM allocates each request's "
            'cross-attention slots before prefill: use keep_ratio (an exact budget), e.g. {"keep_ratio": 0.25}'
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"crosstrim on vLLM does not take {', '.join(unknown)}: every cross-attention layer caches the same "
            f"kept tokens (trim_first_layer_cache is always on); valid options: {', '.join(OPTIONS)}"
        )
    if options.get("keep_ratio") is None:
        raise ValueError('crosstrim on vLLM needs keep_ratio, e.g. {"keep_ratio": 0.25}')
    config = TrimConfig.from_options({**options, "trim_first_layer_cache": True})
    return None if config.is_identity else config


def image_slots(tiles: int, per_tile: int, config: TrimConfig | None) -> int:
    """Cross-attention KV slots an image of ``tiles`` real tiles takes: its valid tokens, or their budget.

    Padding tiles take none: transformers masks them for every row that attends the image, and the rows
    that attend them (text before ``<|image|>``) are computed at prefill from the full encoder output.
    """
    valid = tiles * per_tile
    return valid if config is None else kept_tokens(valid, config.keep_ratio)


def check_budget(per_tile: int, config: TrimConfig | None) -> None:
    """Refuse a budget under one token per tile: two tile counts could then get the same slot count, and
    :func:`valid_tiles` could not tell them apart (at one or more per tile the budget grows with every tile)."""
    if config is not None and config.keep_ratio * per_tile < 1:
        raise ValueError(
            f"keep_ratio={config.keep_ratio:g} keeps less than one token per tile of {per_tile} tokens; "
            f"use keep_ratio >= {1 / per_tile:.4g}"
        )


def valid_tiles(slots: int, max_tiles: int, per_tile: int, config: TrimConfig | None) -> int:
    """The real tile count of an image that was given ``slots`` slots (the inverse of :func:`image_slots`)."""
    for tiles in range(1, max_tiles + 1):
        if image_slots(tiles, per_tile, config) == slots:
            return tiles
    raise ValueError(f"{slots} cross-attention slots match no image of 1 to {max_tiles} tiles")
