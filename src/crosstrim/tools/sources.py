"""Where ``crosstrim eval`` gets its items: the testbed by default, or a file read by its suffix.

``SOURCES`` maps a file suffix to a loader (``Path -> list[Item]``) and the scorer that judges a
prediction against that benchmark's answers. Another format (e.g. VLMEvalKit ``.tsv``) is one new
entry here; the evaluation itself does not change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crosstrim.tools import UserError, checkpoint, vlmeval
from crosstrim.tools.dataset import Item

Scorer = Callable[[Item, str], bool]


@dataclass(frozen=True)
class Source:
    """A dataset file format: how to read it and how to score answers to it."""

    load: Callable[[Path], list[Item]]
    score: Scorer
    description: str


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def exact_match(item: Item, prediction: str) -> bool:
    """The prediction starts with the answer's words (case and punctuation ignored).

    Greedy answers may run on after the answer (a real checkpoint often adds a sentence); only
    the leading words are compared, so "Red." and "red, it is" both match "red".
    """
    answer = _words(item.answer)
    return bool(answer) and _words(prediction)[: len(answer)] == answer


def load_jsonl(path: Path) -> list[Item]:
    """One JSON object a line: ``id``, ``images`` (paths relative to the file), ``prompt``, ``answer``,
    optional ``category`` and ``extra`` -- the format ``crosstrim testbed data`` writes."""
    items = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where} is not JSON ({err.msg}); expected one JSON object per line") from err
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            missing = [key for key in ("id", "images", "prompt", "answer") if key not in record]
            if missing:
                raise UserError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
            images = record["images"]
            if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
                raise UserError(f"{where}: 'images' must be a non-empty list of image paths")
            items.append(
                Item(
                    id=str(record["id"]),
                    images=tuple(checkpoint.load_image(path.parent / p) for p in images),
                    prompt=str(record["prompt"]),
                    answer=str(record["answer"]),
                    category=str(record.get("category", "all")),
                    extra=dict(record.get("extra", {})),
                )
            )
    return items


SOURCES: dict[str, Source] = {
    ".jsonl": Source(load_jsonl, exact_match, "JSON lines: id, images, prompt, answer[, category]"),
    ".tsv": Source(vlmeval.load, vlmeval.correct, "VLMEvalKit TSV: MME, POPE, SEEDBench_IMG, MMVP, yes/no or MCQ"),
}


def load(path: str | Path) -> tuple[list[Item], Scorer]:
    """Items and scorer for a dataset file; a wrong suffix, an unreadable or empty file is a user error."""
    file = Path(path)
    source = SOURCES.get(file.suffix.lower())
    if source is None:
        known = "; ".join(f"{suffix} ({s.description})" for suffix, s in SOURCES.items())
        raise UserError(f"cannot read {str(file)!r}: unknown dataset format {file.suffix or '(none)'!r}; use {known}")
    if not file.is_file():
        raise UserError(f"dataset file {str(file)!r} does not exist")
    try:
        items = source.load(file)
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read {str(file)!r}: not a text file") from err
    if not items:
        raise UserError(f"dataset {str(file)!r} has no items")
    return items, source.score
