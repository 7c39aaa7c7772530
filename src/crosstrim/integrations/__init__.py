"""Adapters that run crosstrim inside other evaluation frameworks (optional dependencies).

``lmms_eval_models`` is the payload of crosstrim's ``lmms_eval.models`` entry point (see
``pyproject.toml``): lmms-eval calls it while building its model registry, so it must stay cheap
and import nothing heavy. The adapter itself lives in :mod:`crosstrim.integrations.lmms_eval`, the writer
of local lmms-eval tasks in :mod:`crosstrim.integrations.lmms_eval_tasks`.
"""

from __future__ import annotations

LMMS_EVAL_MODEL = "llama_vision_trimmed"


def lmms_eval_models():
    """The lmms-eval model manifest for ``--model llama_vision_trimmed``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=LMMS_EVAL_MODEL,
            simple_class_path="crosstrim.integrations.lmms_eval.LlamaVisionTrimmed",
        )
    ]
