"""Model adapters: what is specific to one model family, looked up by ``config.model_type`` (as PEFT does).

Everything Mllama-specific lives in :mod:`crosstrim.adapters.mllama`; the engine asks only the
:class:`~crosstrim.adapters.base.ModelAdapter` interface. A new family is one adapter class and one
line in :data:`ADAPTERS` (docs/extending.md).
"""

from __future__ import annotations

from torch import nn

from crosstrim.adapters.base import ModelAdapter, drift, parameters
from crosstrim.adapters.mllama import MllamaAdapter

_MLLAMA = MllamaAdapter()
# config.model_type -> adapter. The text decoder's own type is listed so that passing it alone gets the
# adapter's precise error ("the whole vision-language model"), not "unsupported family".
ADAPTERS: dict[str, ModelAdapter] = {"mllama": _MLLAMA, "mllama_text_model": _MLLAMA}


def adapter_for(model: nn.Module, caller: str = "crosstrim.trim") -> ModelAdapter:
    """The adapter of ``model``'s family; a model of no known family is a ``TypeError`` naming the supported ones."""
    adapter = ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    if adapter is None:
        supported = "; ".join(sorted({f"{a.family} ({a.description})" for a in ADAPTERS.values()}))
        raise TypeError(f"{caller} supports transformers {supported} models; got {type(model).__name__}")
    return adapter


__all__ = ["ADAPTERS", "MllamaAdapter", "ModelAdapter", "adapter_for", "drift", "parameters"]
