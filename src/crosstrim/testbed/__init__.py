"""The testbed: a small stock Mllama trained on procedural shape questions, shipped inside the package.

No Llama-3.2-Vision weights can be downloaded everywhere crosstrim runs, yet the method only means
something on a model whose attention was *learned*. The testbed is that model: a normal transformers
checkpoint (``MllamaForConditionalGeneration`` + ``MllamaProcessor``) in :data:`CHECKPOINT`, trained by
:mod:`crosstrim.testbed.train` on :mod:`crosstrim.testbed.data`. The tools use it when no ``--model``
is given (:func:`load`), so ``demo``/``eval``/``viz`` work on a fresh clone with nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

from crosstrim.evaluation import UserError, checkpoint

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def load(device: str = "auto", dtype: str = "auto"):
    """``(model, processor)`` of the shipped testbed checkpoint (any other checkpoint: :func:`checkpoint.load
    <crosstrim.evaluation.checkpoint.load>`)."""
    if not (CHECKPOINT / "config.json").is_file():
        raise UserError(
            f"the testbed checkpoint is missing from {CHECKPOINT}; "
            "train it with `crosstrim testbed train --out DIR` and pass --model DIR"
        )
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise UserError(
            f"the built-in testbed's tokenizer files are in the transformers 5 format, and transformers "
            f"{transformers.__version__} cannot read them; upgrade transformers or pass --model DIR"
        )
    return checkpoint.load(CHECKPOINT, device, dtype)


__all__ = ["CHECKPOINT", "load"]
