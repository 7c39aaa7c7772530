"""What a trimmed prefill reports: what it kept and what that costs in cross-attention KV cache
(:class:`TrimStats`), and, on request, what the first cross-attention layer scored
(:class:`FirstLayerScores`). Plain values, read by the tools and the integrations alike."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from crosstrim.engine.memory import cross_kv_bytes


@dataclass(frozen=True)
class TrimStats:
    """What the last prefill kept, per sample, and what it costs in cross-attention KV cache.

    ``kept_indices[b]`` index sample ``b``'s image tokens as transformers lays them out:
    ``image * max_tiles * tokens_per_tile + tile * tokens_per_tile + token``: every slot later layers
    attend and cache. ``kept_counts[b]`` counts only its valid (non-padding) tokens, so it never exceeds
    ``valid_counts[b]``. The two differ at ratio 1.0, the identity, which keeps padding-tile slots too
    (and so saves no cache); any ratio below 1 keeps valid tokens only (k 0.999 drops just the padding tiles).
    A sample with no image keeps nothing and reports 0 kept of 0 valid; the batch keeps its trimmed
    width (see README, "Batches").
    ``summary_tokens`` counts the stand-ins for dropped tokens (``TrimConfig.summarize_dropped``: one
    per image slot) that every trimmed layer caches per sample beside the kept tokens.
    ``image_counts[b]`` is how many images sample ``b`` has, of the batch's ``image_slots`` per row (a
    batch gives every row as many slots as its sample with the most images), so that
    :meth:`sample_kv_bytes` can tell what a sample holds alone from what the batch adds.
    """

    method: str
    kept_indices: tuple[torch.Tensor, ...]
    kept_counts: tuple[int, ...]
    valid_counts: tuple[int, ...]
    image_tokens: int
    cross_layers: int
    trimmed_layers: int
    kv_bytes_full: int
    kv_bytes_kept: int
    kv_bytes_per_token: int
    summary_tokens: int = 0
    image_counts: tuple[int, ...] = ()
    image_slots: int = 1

    def sample_kv_bytes(self, b: int) -> tuple[int, int]:
        """Cross-attention KV bytes ``(full, kept)`` sample ``b`` holds when run alone: neither the kept-slot
        padding nor the image slots of a batch whose other samples have more images.

        A sample without an image holds no cross-attention cache alone (its prompt is text only): ``(0, 0)``.
        """
        if not self.valid_counts[b]:
            return 0, 0
        images = self.image_counts[b]
        image_tokens = self.image_tokens // self.image_slots * images  # every tile slot of its own images
        # Cached slots: at ratio 1.0 every slot (padding tiles too, of its own images alone), else the kept ones.
        slots = min(len(self.kept_indices[b]), image_tokens) + (images if self.summary_tokens else 0)
        held = functools.partial(
            cross_kv_bytes, self.kv_bytes_per_token, batch=1, cross_layers=self.cross_layers, full_tokens=image_tokens
        )
        return held(trimmed_layers=0, kept_width=None), held(trimmed_layers=self.trimmed_layers, kept_width=slots)

    @property
    def kept_fraction(self) -> tuple[float, ...]:
        """Kept / valid (non-padding) image tokens, per sample."""
        return tuple(k / v if v else 1.0 for k, v in zip(self.kept_counts, self.valid_counts))

    @property
    def mean_kept_fraction(self) -> float:
        """Mean kept fraction over the samples that have an image (1.0 when none has)."""
        fractions = [k / v for k, v in zip(self.kept_counts, self.valid_counts) if v]
        return sum(fractions) / len(fractions) if fractions else 1.0

    def summary(self) -> str:
        mb = 1024 * 1024
        return (
            f"{self.method}: kept {self.mean_kept_fraction:.1%} of image tokens "
            f"(per sample {', '.join(f'{k}/{v}' for k, v in zip(self.kept_counts, self.valid_counts))}); "
            f"cross-attn KV {self.kv_bytes_full / mb:.2f} MB -> {self.kv_bytes_kept / mb:.2f} MB"
        )


@dataclass(frozen=True, eq=False)
class FirstLayerScores:
    """What the first cross-attention layer scored at a prefill: the method's input to selection.

    Recorded only when ``TrimHandle.record_scores`` is set (``handle.scores``), so trimming stores
    nothing extra by default. The first layer attends every image token, trimmed or not, so these
    are also the untrimmed model's first-layer attention (what ``crosstrim viz`` draws).
    """

    layer: int  # the first cross-attention layer's index in the text decoder
    scores: torch.Tensor  # (B, H, N) float32: per head, softmax weights summed over the scoring rows
    valid: torch.Tensor  # (B, N) bool: image tokens some scoring row may attend (padding tiles are not)


__all__ = ["FirstLayerScores", "TrimStats"]
