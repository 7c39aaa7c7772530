"""The core: Trimmed Llama's method on plain tensors. Imports torch only, never transformers or a model.

* :mod:`~crosstrim.core.scoring`: which text rows score, which image tokens are valid, the attention
  each token receives per head (:func:`attention_scores`);
* :mod:`~crosstrim.core.methods`: the one budget rule (:func:`budget`), per-sample seeds
  (:func:`derive_seed`), the selection methods and their registry (:func:`get_method`,
  :func:`register_method`);
* :mod:`~crosstrim.core.selection`: the :class:`Selection` that gathers features, masks and caches;
* :mod:`~crosstrim.core.config`: :class:`TrimConfig`, validated against the registry.

A model integration (the engine, the vLLM model) scores with :func:`attention_scores`, selects with
``get_method(config.method).keep(scores, valid, ratio, seeds, adaptive=...)`` (or :func:`select` of a
config) and gathers with :class:`Selection`.
"""

from crosstrim.core.config import TrimConfig
from crosstrim.core.methods import (
    SelectionMethod,
    budget,
    derive_seed,
    fixed_kept_slots,
    get_method,
    kept_tokens,
    mean_topk,
    method_names,
    random_keep,
    register_method,
    sample_seeds,
    select,
    uniform_keep,
    union_budget,
    union_topk,
    unregister_method,
)
from crosstrim.core.scoring import attention_scores, scoring_rows, valid_tokens
from crosstrim.core.selection import Selection

__all__ = [
    "Selection",
    "SelectionMethod",
    "TrimConfig",
    "attention_scores",
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
    "scoring_rows",
    "select",
    "union_budget",
    "union_topk",
    "uniform_keep",
    "unregister_method",
    "valid_tokens",
]
