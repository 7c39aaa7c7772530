"""The testbed: a small stock Mllama trained on procedural shape questions, shipped inside the package.

No Llama-3.2-Vision weights can be downloaded everywhere crosstrim runs, yet the method only means
something on a model whose attention was *learned*. The testbed is that model: a normal transformers
checkpoint (``MllamaForConditionalGeneration`` + ``MllamaProcessor``) in :data:`CHECKPOINT`, trained by
:mod:`crosstrim.testbed.train` on :mod:`crosstrim.testbed.data`. The tools use it when no ``--model``
is given.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"

__all__ = ["CHECKPOINT"]
