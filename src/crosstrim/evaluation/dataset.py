"""The unit of evaluation shared by every dataset source (testbed, VLMEvalKit TSV, lmms-eval tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Item:
    """One question about one or more images.

    Attributes:
        id: stable identifier (row index, testbed id) used in result files and when merging shards.
        images: the images, in the order their ``<|image|>`` tokens appear.
        prompt: the user prompt *without* image tokens (tools add them, or the chat template does).
        answer: the reference answer as the benchmark stores it.
        category: question family / benchmark category, for per-category accuracy.
        extra: anything a benchmark's scorer needs beyond the above (options, sub-task, ...).
    """

    id: str
    images: tuple[Image.Image, ...]
    prompt: str
    answer: str
    category: str
    extra: dict[str, Any] = field(default_factory=dict)
