"""Where ``crosstrim eval`` gets its items: the testbed by default, or a file read by its suffix.

``SOURCES`` maps a file suffix to a loader that returns a :class:`Dataset`: the items, the scorer that
judges one prediction (per-question accuracy) and, for a format whose benchmarks define one, the
official scorer over all of a run's predictions (MME's scores, POPE's F1, ...). Another format is one
new entry here; the evaluation itself does not change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crosstrim.evaluation import UserError, checkpoint, vlmeval_metrics, vlmeval_tsv
from crosstrim.evaluation.dataset import Item

Scorer = Callable[[Item, str], bool]
BenchmarkScorer = Callable[[Sequence[Item], Sequence[str]], dict[str, float]]


@dataclass(frozen=True)
class Dataset:
    """Items to evaluate and how answers to them are scored.

    Attributes:
        items: the questions.
        score: judges one prediction against its item's answer (per-question accuracy).
        official: the benchmark's own metrics over a run's predictions (in item order), or ``None``
            where the format defines none; ``headline`` names the one ``crosstrim eval`` plots.
        headline: a key of what ``official`` returns (``None`` without ``official``).
        skipped: the rows a loader skipped under ``skip_bad``, with where and why.
    """

    items: list[Item]
    score: Scorer
    official: BenchmarkScorer | None = None
    headline: str | None = None
    skipped: list[vlmeval_tsv.Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """A dataset file format: how to read it (``load(file, skip_bad)``) and what it holds."""

    load: Callable[[Path, bool], Dataset]
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


class _BadLine(Exception):
    """A line that cannot become an item; the message says why (the caller adds where)."""


def _jsonl_item(path: Path, record: object) -> Item:
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "images", "prompt", "answer") if key not in record]
    if missing:
        raise _BadLine(f"missing {', '.join(repr(k) for k in missing)}")
    images = record["images"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise _BadLine("'images' must be a non-empty list of image paths")
    try:
        pictures = tuple(checkpoint.load_image(path.parent / p) for p in images)
    except UserError as err:
        raise _BadLine(str(err)) from err
    return Item(
        id=str(record["id"]),
        images=pictures,
        prompt=str(record["prompt"]),
        answer=str(record["answer"]),
        category=str(record.get("category", "all")),
        extra=dict(record.get("extra", {})),
    )


def load_jsonl(path: Path, skip_bad: bool = False) -> Dataset:
    """One JSON object a line: ``id``, ``images`` (paths relative to the file), ``prompt``, ``answer``,
    optional ``category`` and ``extra`` -- the format ``crosstrim testbed data`` writes. Scored by
    :func:`exact_match`; ``skip_bad`` skips (and lists) lines that cannot become items."""
    items, skipped = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            record = None
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _BadLine(f"not JSON ({err.msg}); expected one JSON object per line") from err
                items.append(_jsonl_item(path, record))
            except _BadLine as bad:
                if not skip_bad:
                    raise UserError(f"{where}: {bad}; fix it, or skip bad lines with --skip-bad") from bad
                index = str(record["id"]) if isinstance(record, dict) and "id" in record else ""
                skipped.append(vlmeval_tsv.Skipped(where, index, str(bad)))
    return Dataset(items, exact_match, skipped=skipped)


def load_vlmeval_tsv(path: Path, skip_bad: bool = False) -> Dataset:
    """A VLMEvalKit TSV (:mod:`~crosstrim.evaluation.vlmeval_tsv`): scored per question with the benchmark's
    answer extraction (:func:`~crosstrim.evaluation.vlmeval_metrics.correct`) and officially by
    :func:`~crosstrim.evaluation.vlmeval_metrics.score`."""
    data = vlmeval_tsv.load_tsv(path, skip_bad=skip_bad)
    return Dataset(
        data.items,
        vlmeval_metrics.correct,
        vlmeval_metrics.score,
        vlmeval_metrics.headline(data.benchmark),
        data.skipped,
    )


SOURCES: dict[str, Source] = {
    ".jsonl": Source(load_jsonl, "JSON lines: id, images, prompt, answer[, category]"),
    ".tsv": Source(load_vlmeval_tsv, "VLMEvalKit TSV: MME, POPE, SEEDBench_IMG, MMVP, yes/no or MCQ"),
}


def load(path: str | Path, *, skip_bad: bool = False) -> Dataset:
    """The dataset in a file, read by its suffix; a wrong suffix, an unreadable file, a bad row (unless
    ``skip_bad``) or no items at all is a user error."""
    file = Path(path)
    source = SOURCES.get(file.suffix.lower())
    if source is None:
        known = "; ".join(f"{suffix} ({s.description})" for suffix, s in SOURCES.items())
        raise UserError(f"cannot read {str(file)!r}: unknown dataset format {file.suffix or '(none)'!r}; use {known}")
    if not file.is_file():
        raise UserError(f"dataset file {str(file)!r} does not exist")
    try:
        data = source.load(file, skip_bad)
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read {str(file)!r}: not a text file") from err
    if not data.items:
        skipped = f" ({len(data.skipped)} bad rows skipped)" if data.skipped else ""
        raise UserError(f"dataset {str(file)!r} has no items{skipped}")
    return data
