"""Batched, deterministic answering of evaluation items, full or trimmed: the loop every evaluator shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

import crosstrim
from crosstrim.core import TrimConfig
from crosstrim.evaluation import checkpoint
from crosstrim.evaluation.dataset import Item


@dataclass(frozen=True)
class Prediction:
    """A model's answer to one item and what trimming kept for it (``None`` fields when untrimmed)."""

    id: str
    text: str
    kept: int | None = None
    valid: int | None = None
    kv_bytes_full: int | None = None
    kv_bytes_kept: int | None = None

    @property
    def kept_fraction(self) -> float | None:
        return self.kept / self.valid if self.kept is not None and self.valid else None


def batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def encode(processor, items: Sequence[Item], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch, left-padded so generated tokens line up at the end.

    The side is passed per call (not set on the tokenizer) so the caller's processor is left as it was.
    """
    texts = [checkpoint.format_prompt(processor, item.prompt, len(item.images)) for item in items]
    images = [list(item.images) for item in items]
    encoded = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    return encoded.to(device)


def greedy(processor, max_new_tokens: int) -> dict:
    """The ``generate`` settings every tool answers with: greedy, one beam, the processor's pad id, so
    eval, calibrate and batch give the same answer to the same request."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }


def answer_texts(processor, sequences: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
    """The generated part of every row of ``sequences`` (prompt + new tokens), decoded without special
    tokens and stripped."""
    texts = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]


def predict(
    model,
    processor,
    items: Sequence[Item],
    config: TrimConfig | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Greedy answers for ``items`` with the untrimmed model (``config=None``) or a trimmed one.

    Greedy decoding and a fixed batch order make the result deterministic; ``progress`` is called
    with the number of items finished after each batch.
    """
    handle = crosstrim.trim(model, config) if config is not None else None
    predictions: list[Prediction] = []
    try:
        for batch in batches(items, batch_size):
            inputs = encode(processor, batch, model.device)
            with torch.no_grad():
                tokens = model.generate(**inputs, **greedy(processor, max_new_tokens))
            texts = answer_texts(processor, tokens, inputs)
            stats = handle.stats if handle is not None else None
            for row, (item, text) in enumerate(zip(batch, texts)):
                if stats is None:
                    predictions.append(Prediction(item.id, text))
                    continue
                full, kept = stats.sample_kv_bytes(row)
                predictions.append(
                    Prediction(
                        item.id,
                        text,
                        kept=stats.kept_counts[row],
                        valid=stats.valid_counts[row],
                        kv_bytes_full=full,
                        kv_bytes_kept=kept,
                    )
                )
            if progress is not None:
                progress(len(batch))
    finally:
        if handle is not None:
            handle.remove()
    return predictions
