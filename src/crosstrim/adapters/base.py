"""What the engine needs to know about a model family, behind one small interface.

The engine (hooks, generate, accounting) is the same for every cross-attention model; what differs is
where the text decoder and its cross-attention layers are, which modules compute the first layer's
queries and keys, and how many image tokens an image slot has. A :class:`ModelAdapter` answers these
for one family and refuses a model that moved any of it (:func:`drift`): a release that renames what
crosstrim reads fails loudly instead of running untrimmed.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn


def drift(detail: str, family: str = "Mllama") -> RuntimeError:
    """The error for a transformers model that no longer looks the way crosstrim hooks into it."""
    import transformers

    return RuntimeError(
        f"crosstrim cannot trim this {family} model under transformers {transformers.__version__}: {detail}. "
        "crosstrim is tested with transformers 4.57.3 and 5.24.0 (README, 'Supported versions') and refuses "
        "to run rather than run untrimmed; use a tested version or report the change"
    )


def parameters(function: Any) -> set[str]:
    """The parameter names ``function`` takes (empty when it has no inspectable signature)."""
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


class ModelAdapter(ABC):
    """One model family's answers to what the engine asks. Register an instance in
    :data:`crosstrim.adapters.ADAPTERS` under each ``config.model_type`` it serves.

    Attributes:
        family: the family's name in errors (``"Mllama"``).
        description: the models it serves, for the error a model of no known family gets.
    """

    family: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder whose cross-attention layers are trimmed; ``TypeError`` for a part of a model."""

    @abstractmethod
    def check_generation_model(self, model: nn.Module) -> None:
        """Refuse (``TypeError``) a model ``crosstrim.generate`` cannot call ``generate`` on."""

    @abstractmethod
    def cross_layers(self, decoder: nn.Module) -> list[int]:
        """Indices of the cross-attention layers in ``decoder.layers``, ascending (checked: they exist and take
        the arguments the hooks read)."""

    @abstractmethod
    def capture_points(self, decoder: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are layer ``layer``'s queries ``(B, H, L, d)`` and keys ``(B, G, N, d)``
        as its attention uses them (the first cross layer's scores are computed from them)."""

    @abstractmethod
    def scaling(self, decoder: nn.Module, layer: int) -> float:
        """The softmax scaling of layer ``layer``'s attention."""

    @abstractmethod
    def image_slot_tokens(self, model: nn.Module) -> int:
        """Image tokens one image slot occupies in a cross layer's input (all tiles, padding tiles included)."""

    @abstractmethod
    def kv_shape(self, decoder: nn.Module) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of the decoder's attention layers: the KV bytes per cached token."""


__all__ = ["ModelAdapter", "drift", "parameters"]
