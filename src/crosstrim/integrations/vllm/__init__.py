"""crosstrim's vLLM plugin: Llama-3.2-Vision (``MllamaForConditionalGeneration``) on vLLM V1, optionally trimmed.

``register`` is the payload of crosstrim's ``vllm.general_plugins`` entry point (``pyproject.toml``): vLLM
calls it in every process it starts, before it reads a checkpoint, so it stays cheap and imports the
model lazily. Modules: :mod:`.settings` (the ``crosstrim`` config key, slot counts), :mod:`.selection`
(one request's kept tokens, with crosstrim's method code), :mod:`.hf_config` (the config vLLM must see)
and :mod:`.model` (the vLLM model and its multimodal processor).
"""

from __future__ import annotations

ARCHITECTURE = "MllamaForConditionalGeneration"


def register() -> None:
    """Serve ``MllamaForConditionalGeneration`` checkpoints with our model (vLLM dropped its own after 0.10.2)."""
    from vllm import ModelRegistry
    from vllm.transformers_utils import config as vllm_config

    from crosstrim.integrations.vllm.hf_config import MllamaEncoderDecoderConfig

    # vLLM builds the config class it lists for a model type; ours declares Mllama an encoder-decoder model.
    vllm_config._CONFIG_REGISTRY["mllama"] = MllamaEncoderDecoderConfig
    ModelRegistry.register_model(ARCHITECTURE, "crosstrim.integrations.vllm.model:MllamaForConditionalGeneration")
