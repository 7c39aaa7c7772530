"""crosstrim: trim the image features cross-attention vision-language models attend to.

Reference implementation of Trimmed Llama (Lee et al., arXiv 2504.00557) for Hugging Face
``MllamaForConditionalGeneration`` (Llama-3.2-Vision)::

    handle = crosstrim.trim(model, crosstrim.TrimConfig(k_ratio=0.25))
    model.generate(**inputs)     # trimmed prefill and decode
    handle.stats                 # what the last prefill kept
    crosstrim.generate(model, prefill_batch_size=4, **inputs)  # prefill 4 samples at a time
    handle.remove()              # back to the original model

The method itself lives in :mod:`crosstrim.core` and works on plain tensors; the hooks and
``generate`` in :mod:`crosstrim.engine`; what is Mllama-specific in :mod:`crosstrim.adapters.mllama`.
"""

from crosstrim.core import TrimConfig
from crosstrim.engine import TrimHandle, TrimStats, generate, trim, trimmed

__version__ = "0.1.0"

__all__ = ["TrimConfig", "TrimHandle", "TrimStats", "generate", "trim", "trimmed", "__version__"]
