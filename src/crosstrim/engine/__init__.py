"""The engine: model-agnostic trimming of a stock transformers model through forward hooks.

* :mod:`~crosstrim.engine.handle`: :func:`trim`, :func:`trimmed`, :class:`TrimHandle` (the hooks and
  the per-call, per-thread state);
* :mod:`~crosstrim.engine.generation`: :func:`generate`, micro-batched prefill into one merged cache;
* :mod:`~crosstrim.engine.cache`: the cache argument's name, cached keys/values, refused caches;
* :mod:`~crosstrim.engine.stats`: what a prefill reports (:class:`TrimStats`, :class:`FirstLayerScores`);
* :mod:`~crosstrim.engine.memory`: the one KV-byte accounting and the analytic memory model.

It imports the core (:mod:`crosstrim.core`) and the model adapters (:mod:`crosstrim.adapters`), torch
and transformers, nothing above.
"""

from crosstrim.engine.generation import generate
from crosstrim.engine.handle import TrimHandle, trim, trimmed
from crosstrim.engine.stats import FirstLayerScores, TrimStats

__all__ = ["FirstLayerScores", "TrimHandle", "TrimStats", "generate", "trim", "trimmed"]
