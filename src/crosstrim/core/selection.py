"""The :class:`Selection`: which image tokens later layers see, applied alike to features, masks and caches.

Shapes use ``B`` batch, ``G`` KV heads, ``L`` text rows, ``N`` image tokens, ``K`` kept slots, ``D``
features. No model, no transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Selection:
    """Which image tokens later layers see, as one value applied alike to features, masks and caches.

    Like ToMe's merge/unmerge pair, one selection is computed once (at the first cross-attention
    layer) and then applied to every tensor laid out over the ``N`` image tokens: features
    ``(B, N, D)``, additive masks ``(B, 1, L, N)``, cached keys and values ``(B, G, N, d)``. Every
    application lays the slots out the same way, so a gathered mask always matches the gathered
    features and the cache they produce:

    * ``K`` kept slots: row ``b``'s kept tokens in ascending (spatial) order, then padding slots
      (``slot_valid`` False) up to the batch's largest kept count; padding slots are zero features
      (zero keys and values in Mllama's bias-free projections) and masked (dtype-min) columns;
    * with ``dropped`` set, ``images`` summary slots follow: one stand-in per image slot for the
      tokens it dropped (see :meth:`features` and :meth:`mask`).

    Attributes:
        index: ``(B, K)`` long, token positions of the kept slots (0 in padding slots).
        slot_valid: ``(B, K)`` bool, True where a slot holds a kept token.
        full_tokens: ``N``, the image tokens the selection was made over.
        images: image slots per row (each ``N // images`` tokens long).
        dropped: ``(B, N)`` bool, the tokens summarised by one stand-in per image, or ``None`` for no
            summary slots (``TrimConfig.summarize_dropped`` off).
    """

    index: torch.Tensor
    slot_valid: torch.Tensor
    full_tokens: int
    images: int = 1
    dropped: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.index.shape != self.slot_valid.shape or self.index.dim() != 2:
            raise ValueError(
                f"index and slot_valid must both be (B, K); got {tuple(self.index.shape)} and "
                f"{tuple(self.slot_valid.shape)}"
            )
        if self.images < 1 or self.full_tokens % self.images:
            raise ValueError(f"{self.full_tokens} image tokens do not split into {self.images} image slots")
        if self.dropped is not None and self.dropped.shape != (self.index.shape[0], self.full_tokens):
            raise ValueError(
                f"dropped must be (B, N) = ({self.index.shape[0]}, {self.full_tokens}), got {tuple(self.dropped.shape)}"
            )

    @classmethod
    def from_keep(cls, keep: torch.Tensor, images: int = 1, dropped: torch.Tensor | None = None) -> Selection:
        """The selection of the ``(B, N)`` keep mask ``keep``.

        ``K`` is the largest kept count in the batch, at least 1: attention over zero slots is
        undefined, so a batch that keeps nothing still gets one, masked, slot. ``dropped`` (e.g.
        ``valid & ~keep`` for ``TrimConfig.summarize_dropped``) adds one summary slot per image.
        """
        if keep.dim() != 2 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a (B, N) bool mask, got {keep.dtype} {tuple(keep.shape)}")
        counts = keep.sum(-1)
        width = max(int(counts.max()) if keep.numel() else 0, 1)
        order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
        slot_valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
        return cls(order.masked_fill(~slot_valid, 0), slot_valid, keep.shape[1], images, dropped)

    # -- shape ---------------------------------------------------------------------------------------

    @property
    def kept_slots(self) -> int:
        """``K``: the kept slots per row (a row's kept tokens, then padding)."""
        return self.index.shape[1]

    @property
    def summary_slots(self) -> int:
        """Summary slots per row: one per image slot with ``dropped`` set, else 0."""
        return self.images if self.dropped is not None else 0

    @property
    def width(self) -> int:
        """Slots per row that gathered features, masks and later layers' caches hold."""
        return self.kept_slots + self.summary_slots

    # -- applying it ---------------------------------------------------------------------------------

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, N, D)`` to ``(B, width, D)``: the kept ones, then one summary per image.

        A summary token is the mean of its image's dropped features (zeros where none was dropped).
        Softmax attention reads *shares*: once tokens are gone, the kept ones split all the attention
        among themselves, and anything a later layer estimates from a share (how many objects, how
        much of the image is background) shifts. The mean of the dropped features, attended with its
        logit raised by ``log(count)`` (:meth:`mask`), takes back about the mass the dropped tokens
        had -- ToMe's proportional attention for one merged token. Values are linear in the
        features, so the stand-in's value is exactly the dropped values' mean; its key is the mean up
        to the key norm.
        """
        self._check(states, 1, "features (B, N, D)", 3)
        kept = _gather_slots(states[:, None], *self._on(states.device))[:, 0]
        if self.dropped is None:
            return kept
        batch, tokens, dim = states.shape
        per_image = tokens // self.images
        weights = self.dropped.to(device=states.device, dtype=states.dtype).view(batch, self.images, per_image)
        sums = torch.einsum("bis,bisd->bid", weights, states.view(batch, self.images, per_image, dim))
        return torch.cat([kept, sums / weights.sum(-1).clamp(min=1)[..., None]], dim=1)

    def mask(self, additive_mask: torch.Tensor) -> torch.Tensor:
        """An additive mask ``(B, 1, L, N)`` to ``(B, 1, L, width)``; padding slots get dtype-min.

        Rows that transformers left all-zero (may attend nothing, so attend uniformly) stay zero on
        kept slots: they attend uniformly to the kept tokens, never to padding slots. A row may
        attend an image's summary slot where it may attend any of that image's tokens (Mllama's
        masks give a row all of an image's valid tiles or none), with bias ``log(dropped count)``;
        an image that dropped nothing has its summary slot masked.
        """
        self._check(additive_mask, 3, "additive mask (B, 1, L, N)", 4)
        index, slot_valid = self._on(additive_mask.device)
        batch, _, length, tokens = additive_mask.shape
        minimum = torch.finfo(additive_mask.dtype).min
        kept = torch.gather(additive_mask, 3, index[:, None, None, :].expand(batch, 1, length, -1))
        kept = kept.masked_fill(~slot_valid[:, None, None, :], minimum)
        if self.dropped is None:
            return kept
        per_image = tokens // self.images
        counts = self.dropped.to(additive_mask.device).view(batch, self.images, per_image).sum(-1)[:, None, None, :]
        allowed = (additive_mask.view(batch, 1, length, self.images, per_image) == 0).any(-1)
        bias = torch.log(counts.clamp(min=1).to(additive_mask.dtype))
        return torch.cat([kept, torch.where(allowed & (counts > 0), bias, minimum)], dim=-1)

    def cache(self, tensor: torch.Tensor) -> torch.Tensor:
        """A cached ``(B, G, N, d)`` key or value tensor to its ``(B, G, K, d)`` kept slots (padding zeros).

        Summary slots cannot be made from a cache: a cached key went through ``k_norm``, so the
        mean of cached keys is not the key of the mean feature. A selection with ``dropped`` is
        refused (``TrimConfig`` allows no ``summarize_dropped`` with ``trim_first_layer_cache``).
        """
        if self.dropped is not None:
            raise ValueError(
                "summary slots come from features, not from a cache: gather the features instead "
                "(summarize_dropped needs trim_first_layer_cache=False)"
            )
        self._check(tensor, 2, "cache tensor (B, G, N, d)", 4)
        return _gather_slots(tensor, *self._on(tensor.device))

    def widen(self, gathered: torch.Tensor, kept_slots: int, dim: int) -> torch.Tensor:
        """A tensor gathered by this selection (``width`` slots along ``dim``) laid out for ``kept_slots`` kept slots.

        ``kept_slots - K`` zero slots go after the kept ones (before any summary slots): the layout
        a wider selection's padding slots have, so tensors gathered per part of a batch can be
        concatenated under :meth:`concatenate` of their selections (zeros are what padding slots
        of features and caches hold; a mask is re-gathered from the concatenated selection instead).
        """
        if gathered.shape[dim] != self.width:
            raise ValueError(f"expected {self.width} slots along dim {dim}, got {tuple(gathered.shape)}")
        if kept_slots < self.kept_slots:
            raise ValueError(f"cannot narrow {self.kept_slots} kept slots to {kept_slots}")
        if kept_slots == self.kept_slots:
            return gathered
        shape = list(gathered.shape)
        shape[dim] = kept_slots - self.kept_slots
        kept, summaries = gathered.split([self.kept_slots, self.summary_slots], dim=dim)
        return torch.cat([kept, gathered.new_zeros(shape), summaries], dim=dim)

    # -- batch operations ----------------------------------------------------------------------------

    @classmethod
    def concatenate(cls, selections: Sequence[Selection]) -> Selection:
        """Several selections' rows as one batch, padded with masked slots to the largest ``K``.

        Equal to the selection of the rows' keep masks concatenated (see :meth:`widen` for the
        tensors gathered by each part).
        """
        if not selections:
            raise ValueError("concatenate needs at least one selection")
        first = selections[0]
        for other in selections[1:]:
            if (other.full_tokens, other.images, other.dropped is None) != (
                first.full_tokens,
                first.images,
                first.dropped is None,
            ):
                raise ValueError(
                    "only selections over the same image tokens, image slots and summary setting concatenate: "
                    f"N={first.full_tokens}/{other.full_tokens}, images={first.images}/{other.images}, "
                    f"summaries={first.dropped is not None}/{other.dropped is not None}"
                )
        width = max(s.kept_slots for s in selections)
        pad = torch.nn.functional.pad
        index = torch.cat([pad(s.index, (0, width - s.kept_slots)) for s in selections])
        slot_valid = torch.cat([pad(s.slot_valid, (0, width - s.kept_slots)) for s in selections])
        dropped = None if first.dropped is None else torch.cat([s.dropped for s in selections])  # type: ignore[misc]
        return cls(index, slot_valid, first.full_tokens, first.images, dropped)

    def repeat_interleave(self, repeats: int) -> Selection:
        """Every row repeated ``repeats`` times in place: beams and return sequences share their sample's selection."""
        if repeats == 1:
            return self
        dropped = None if self.dropped is None else self.dropped.repeat_interleave(repeats, dim=0)
        return Selection(
            self.index.repeat_interleave(repeats, dim=0),
            self.slot_valid.repeat_interleave(repeats, dim=0),
            self.full_tokens,
            self.images,
            dropped,
        )

    # -- helpers -------------------------------------------------------------------------------------

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.to(device), self.slot_valid.to(device)

    def _check(self, tensor: torch.Tensor, dim: int, what: str, ndim: int) -> None:
        batch = self.index.shape[0]
        if tensor.dim() != ndim or tensor.shape[0] != batch or tensor.shape[dim] != self.full_tokens:
            raise ValueError(
                f"this selection applies to a {what} tensor with B={batch}, N={self.full_tokens}; "
                f"got {tuple(tensor.shape)}"
            )


def _gather_slots(tensor: torch.Tensor, index: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """Gather ``(B, G, N, d)`` to ``(B, G, K, d)`` along the tokens; padding slots (``slot_valid`` False) are zeros.

    Zero features give zero keys and values in Mllama's bias-free projections, so a row whose every
    slot is padding (a sample without an image) reads nothing instead of a copy of token 0.
    ``index_select`` on a flat view copies whole rows (several times faster than ``torch.gather``
    with an expanded index, which copies element by element); a strided tensor (Mllama caches a
    transposed view) keeps ``gather``, as a flat view would copy it first.
    """
    batch, groups, tokens, dim = tensor.shape
    if not tensor.is_contiguous():
        gathered = torch.gather(tensor, 2, index[:, None, :, None].expand(batch, groups, -1, dim))
    else:
        base = torch.arange(batch * groups, device=index.device).view(batch, groups, 1) * tokens
        rows = (base + index[:, None, :]).reshape(-1)
        gathered = tensor.reshape(batch * groups * tokens, dim).index_select(0, rows).view(batch, groups, -1, dim)
    return gathered.masked_fill_(~slot_valid[:, None, :, None], 0)


__all__ = ["Selection"]
