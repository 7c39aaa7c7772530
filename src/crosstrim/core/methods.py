"""Selection methods on plain tensors, and the registry that names them. No model, no transformers.

A selection method is one :class:`SelectionMethod` subclass registered under its name
(:func:`register_method`). It declares what it reads (first-layer attention ``scores`` ``(B, H, N)``,
one ``seed`` per row) and whether its kept count adapts to the input (it then accepts ``k_ratio``);
:class:`~crosstrim.TrimConfig`'s checks, the CLI's ``--method`` choices and the sweeps' defaults are
read from the registry, so a new method is one class in one file (docs/extending.md). Every method
returns a ``(B, N)`` keep mask over the ``valid`` tokens and keeps ``ceil(ratio * valid)`` per row
(:func:`budget`, the one rounding rule) unless it adapts.

The built-in rules are also plain functions (:func:`union_topk`, ...), checked in the tests against
brute-force oracles. Everything is deterministic for a given input (the random baseline takes one
seed per row), so a model integration can be checked against these functions directly.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from crosstrim.core.config import TrimConfig


def budget(valid_count: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ceil(ratio * valid_count)`` per row, robust to float noise (0.1 * 30 is 3, not 4): the one budget rule."""
    return torch.ceil(valid_count.to(torch.float64) * ratio - 1e-6).clamp(min=0).to(torch.long)


def fixed_kept_slots(valid_counts: torch.Tensor, ratio: float) -> int:
    """``K``, the kept slots a fixed-ratio selection of ``(B, images)`` valid-token counts has.

    Every fixed-ratio method keeps exactly ``ceil(ratio * valid)`` tokens of each image (a row keeps
    their sum), and :meth:`Selection.from_keep` gives at least one slot; known before anything is
    scored, so a batch's cache can be allocated at its final width before its prefill.
    """
    kept = budget(valid_counts, ratio).sum(-1)
    return max(int(kept.max()) if kept.numel() else 0, 1)


def kept_tokens(valid: int, ratio: float) -> int:
    """:func:`budget` of one count: the tokens an exact kept fraction ``ratio`` keeps of ``valid``."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ValueError(f"kept fraction must be in (0, 1], got {ratio}")
    return int(budget(torch.tensor([valid]), ratio)[0])


def _keep_top(key: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, N)``: the ``count[b]`` largest entries of ``key[b]`` (stable on ties)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return ranks < count[:, None]


def _head_ranks(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank ``(B, H, N)`` of every token within its head (0 = most attended); invalid tokens last."""
    masked = scores.masked_fill(~valid[:, None, :], float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def union_topk(scores: torch.Tensor, valid: torch.Tensor, k_ratio: float) -> torch.Tensor:
    """The paper's rule: every head keeps its top ``ceil(k_ratio * valid)`` tokens; keep the union.

    Returns ``(B, N)`` bool. The kept count is not fixed: it grows when heads look at different
    tokens, which is how the method adapts its budget to the input.
    """
    k = budget(valid.sum(-1), k_ratio)
    return (_head_ranks(scores, valid) < k[:, None, None]).any(dim=1) & valid


def union_budget(scores: torch.Tensor, valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Exactly ``ceil(keep_ratio * valid)`` tokens, chosen the way :func:`union_topk` chooses.

    Tokens are ordered by their best rank over heads (every head's top-1, then every head's
    top-2, ...), ties broken by the highest single-head score. A prefix of that order is the
    union of per-head top-k for growing k, so the fixed budget keeps what the adaptive rule
    would keep, cut at the requested size.
    """
    best_rank = _head_ranks(scores, valid).min(dim=1).values.to(torch.float64)
    best_score = scores.max(dim=1).values.to(torch.float64)
    # Rank dominates; the score (a softmax sum, bounded by L) only breaks ties within a rank.
    squashed = best_score / (1.0 + best_score.abs())
    key = (-best_rank + 0.5 * squashed).masked_fill(~valid, float("-inf"))
    return _keep_top(key, budget(valid.sum(-1), keep_ratio)) & valid


def mean_topk(scores: torch.Tensor, valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Baseline: sum scores over heads, keep one global top ``ceil(keep_ratio * valid)``."""
    key = scores.sum(dim=1).masked_fill(~valid, float("-inf"))
    return _keep_top(key, budget(valid.sum(-1), keep_ratio)) & valid


def derive_seed(seed: int, *parts: Sequence[int]) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and the integer sequences ``parts``.

    The random baseline seeds every sample from the sample itself (its token ids, its image
    layout), so what it keeps cannot depend on the batch, the padding, the process or the order
    samples are run in. Only exact integers are hashed (blake2b over little-endian int64, each
    part length-prefixed so ``(1, 2), (3,)`` and ``(1,), (2, 3)`` differ): hashing float features
    would make the draw depend on the kernels and the device that computed them.
    """
    digest = hashlib.blake2b(struct.pack("<Q", seed % (1 << 64)), digest_size=8)
    for part in parts:
        values = [int(v) for v in part]
        digest.update(struct.pack(f"<q{len(values)}q", len(values), *values))
    return int.from_bytes(digest.digest(), "little") >> 1


def sample_seeds(seed: int, token_ids: Sequence[int], valid: torch.Tensor) -> list[int]:
    """One seed per image slot of one sample, for a method that needs seeds (the random baseline).

    ``token_ids`` are the sample's non-padding prompt ids and ``valid`` its ``(image slots, tokens per slot)``
    valid tokens. The sample's seed hashes ``seed``, the ids and the valid-token layout up to its last image
    (slots past it, which only a batch adds, are left out); each slot's seed hashes that and the slot's
    index. Every integration derives seeds here, so a sample keeps the same tokens in any batch, padding,
    process or engine (transformers hooks and the vLLM model alike).
    """
    used = valid.any(dim=-1).nonzero()
    layout = valid[: int(used.max()) + 1 if used.numel() else 0].flatten().tolist()
    sample = derive_seed(seed, [int(t) for t in token_ids], layout)
    return [derive_seed(sample, (image,)) for image in range(valid.shape[0])]


def random_keep(valid: torch.Tensor, keep_ratio: float, seeds: Sequence[int]) -> torch.Tensor:
    """Baseline: ``ceil(keep_ratio * valid)`` valid tokens drawn uniformly, row ``b`` from ``seeds[b]``.

    Every row draws its noise from its own CPU generator (then moved to ``valid``'s device), so a
    row's kept set depends on its seed and its valid tokens only: not on the other rows, nor on
    how many draws came before, nor on the device.
    """
    rows, tokens = valid.shape
    if len(seeds) != rows:
        raise ValueError(f"random_keep needs one seed per row: {rows} rows, {len(seeds)} seeds")
    noise = torch.empty(rows, tokens, dtype=torch.float32)
    for row, seed in enumerate(seeds):
        noise[row] = torch.rand(tokens, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    key = noise.to(valid.device).masked_fill(~valid, float("-inf"))
    return _keep_top(key, budget(valid.sum(-1), keep_ratio)) & valid


def uniform_keep(valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Baseline: ``ceil(keep_ratio * valid)`` tokens evenly spaced over the valid tokens.

    Valid tokens are laid out tile by tile in raster order, so an even stride over them is a
    spatial stride inside every tile (a fixed, input-independent pooling pattern).
    """
    count = valid.sum(-1)
    k = budget(count, keep_ratio)
    order = torch.cumsum(valid.to(torch.long), dim=-1) - 1  # position among valid tokens
    # Token j (0-based among valid) is kept when it is the first to reach a multiple of count/k.
    k_safe = k.clamp(min=1)[:, None]
    slot = torch.div(order * k_safe, count.clamp(min=1)[:, None], rounding_mode="floor")
    previous = torch.div((order - 1) * k_safe, count.clamp(min=1)[:, None], rounding_mode="floor")
    first_in_slot = (order == 0) | (slot != previous)
    return valid & first_in_slot & (k[:, None] > 0)


# -- the registry ------------------------------------------------------------------------------------


class SelectionMethod:
    """A selection rule: subclass it, set the class attributes, implement :meth:`select`, register it.

    Attributes:
        name: what ``TrimConfig(method=...)`` and ``--method`` call it.
        needs_scores: reads the first cross-attention layer's per-head scores ``(B, H, N)``; the
            engine scores only for methods that need them (or when scores are recorded).
        needs_seeds: reads one integer seed per row (:func:`derive_seed` of ``TrimConfig.seed`` and
            the sample), so a row keeps the same tokens in any batch.
        adaptive: accepts ``k_ratio``, a budget whose kept count adapts to the input; such a method
            defaults to ``k_ratio=default_k_ratio`` when no ratio is given. Every method accepts
            ``keep_ratio`` (exactly :func:`budget` tokens per row).
    """

    name: ClassVar[str]
    needs_scores: ClassVar[bool] = False
    needs_seeds: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    default_k_ratio: ClassVar[float] = 0.25

    def select(
        self,
        scores: torch.Tensor | None,
        valid: torch.Tensor,
        ratio: float,
        seeds: Sequence[int] | None,
        *,
        adaptive: bool,
    ) -> torch.Tensor:
        """The ``(B, N)`` bool keep mask, a subset of ``valid``.

        ``scores`` is given when :attr:`needs_scores`, ``seeds`` (one per row) when :attr:`needs_seeds`;
        ``adaptive`` is True when ``ratio`` is a ``k_ratio`` (only for :attr:`adaptive` methods).
        """
        raise NotImplementedError

    def keep(
        self,
        scores: torch.Tensor | None,
        valid: torch.Tensor,
        ratio: float,
        seeds: Sequence[int] | None = None,
        *,
        adaptive: bool = False,
    ) -> torch.Tensor:
        """:meth:`select`, after checking that the method gets what it declared; ratio 1.0 keeps every valid token."""
        if ratio == 1.0:
            return valid.clone()
        if self.needs_scores and scores is None:
            raise ValueError(f"method={self.name!r} needs attention scores")
        if self.needs_seeds and seeds is None:
            raise ValueError(f"method={self.name!r} needs one seed per row (see crosstrim.core.derive_seed)")
        if adaptive and not self.adaptive:
            raise ValueError(f"method={self.name!r} takes keep_ratio, not k_ratio")
        return self.select(scores, valid, ratio, seeds, adaptive=adaptive)


_REGISTRY: dict[str, type[SelectionMethod]] = {}


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Register ``cls`` under ``cls.name`` (a class decorator); a name registered twice is refused."""
    if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)):
        raise TypeError(f"register_method takes a SelectionMethod subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"{cls.__name__}.name must be a non-empty string without surrounding spaces")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a selection method named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove the method registered as ``name`` (a test or plugin that registered one cleans up)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def get_method(name: str) -> SelectionMethod:
    """The method registered as ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def select(
    config: TrimConfig,
    scores: torch.Tensor | None,
    valid: torch.Tensor,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """The ``(B, N)`` keep mask of the method ``config`` names, at its ratio."""
    return get_method(config.method).keep(scores, valid, config.ratio, seeds, adaptive=config.k_ratio is not None)


@register_method
class Trimmed(SelectionMethod):
    """The paper's rule: union of per-head top-k (:func:`union_topk`); with ``keep_ratio``, :func:`union_budget`."""

    name = "trimmed"
    needs_scores = True
    adaptive = True

    def select(self, scores, valid, ratio, seeds, *, adaptive):
        return union_topk(scores, valid, ratio) if adaptive else union_budget(scores, valid, ratio)


@register_method
class Mean(SelectionMethod):
    """Baseline: scores summed over heads, one global top-k (:func:`mean_topk`)."""

    name = "mean"
    needs_scores = True

    def select(self, scores, valid, ratio, seeds, *, adaptive):
        return mean_topk(scores, valid, ratio)


@register_method
class Random(SelectionMethod):
    """Baseline: a seeded uniform draw per row (:func:`random_keep`)."""

    name = "random"
    needs_seeds = True

    def select(self, scores, valid, ratio, seeds, *, adaptive):
        return random_keep(valid, ratio, seeds)


@register_method
class Uniform(SelectionMethod):
    """Baseline: evenly strided positions inside every tile (:func:`uniform_keep`)."""

    name = "uniform"

    def select(self, scores, valid, ratio, seeds, *, adaptive):
        return uniform_keep(valid, ratio)


__all__ = [
    "SelectionMethod",
    "budget",
    "derive_seed",
    "fixed_kept_slots",
    "get_method",
    "kept_tokens",
    "mean_topk",
    "method_names",
    "random_keep",
    "register_method",
    "sample_seeds",
    "select",
    "union_budget",
    "union_topk",
    "uniform_keep",
    "unregister_method",
]
