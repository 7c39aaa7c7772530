"""The checkpoint config as vLLM must see it: Mllama declared an encoder-decoder model. No vLLM import.

vLLM runs cross-attention KV (slots sized from the encoder input, chunked prefill and prefix caching off)
only for configs whose ``is_encoder_decoder`` is true; transformers' ``MllamaConfig`` says false, because
in transformers the image is not an encoder input. vLLM loads this class for ``model_type: mllama`` once
the plugin registers it, so a stock checkpoint needs no override.
"""

from __future__ import annotations

from transformers import MllamaConfig


class MllamaEncoderDecoderConfig(MllamaConfig):
    """``MllamaConfig`` with ``is_encoder_decoder`` set, whatever the checkpoint's file says."""

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = True
