"""Where ``crosstrim eval`` gets its items: the testbed by default, or a file read by its suffix.

``SOURCES`` maps a file suffix to a loader that returns a :class:`Dataset`: the items, the scorer that
judges one prediction (per-question accuracy) and, for a format whose benchmarks define one, the
official scorer over all of a run's predictions (MME's scores, POPE's F1, ...). Another format is one
new entry here; the evaluation itself does not change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
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
        benchmark: the benchmark whose scoring applies (a VLMEvalKit name), ``None`` for plain items.
        groups: the items the official metrics judge together (positions, see
            :func:`~crosstrim.evaluation.vlmeval_metrics.scored_together`); ``None``: each item alone.
    """

    items: list[Item]
    score: Scorer
    official: BenchmarkScorer | None = None
    headline: str | None = None
    skipped: list[vlmeval_tsv.Skipped] = field(default_factory=list)
    benchmark: str | None = None
    groups: Callable[[Sequence[Item]], list[list[int]]] | None = None

    def limited(self, limit: int) -> Dataset:
        """The first ``limit`` items, cut between groups (an MME image pair, an MMVP case) and never inside
        one, since a split group scores wrongly: whole groups in order while they fit, at least one."""
        groups = self.groups(self.items) if self.groups is not None else [[row] for row in range(len(self.items))]
        chosen: list[int] = []
        for group in groups:
            if chosen and len(chosen) + len(group) > limit:
                break
            chosen += group
        return replace(self, items=[self.items[row] for row in sorted(chosen)])


@dataclass(frozen=True)
class Source:
    """A dataset file format: how to read it (``load(file, skip_bad, benchmark)``) and what it holds."""

    load: Callable[[Path, bool, str | None], Dataset]
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


class BadLine(Exception):
    """A line that cannot become an item; the message says why (the caller adds where)."""


def json_lines(path: Path) -> Iterator[tuple[int, str, object]]:
    """``(line number, "NAME line N", record)`` for every non-blank line of a JSON-lines file: the one reader of
    JSON lines (datasets, calibration requests). ``record`` is a :class:`BadLine` where the line is not JSON,
    so a caller that skips bad lines goes on."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                record = BadLine(f"not JSON ({err.msg}); expected one JSON object per line")
            yield number, f"{path.name} line {number}", record


def line_images(path: Path, record: dict) -> tuple:
    """The images a JSON line's ``images`` names (paths relative to the file ``path``), loaded as RGB."""
    images = record["images"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise BadLine("'images' must be a non-empty list of image paths")
    try:
        return tuple(checkpoint.load_image(path.parent / p) for p in images)
    except UserError as err:
        raise BadLine(str(err)) from err


def _jsonl_item(path: Path, record: object) -> Item:
    if isinstance(record, BadLine):
        raise record
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "images", "prompt", "answer") if key not in record]
    if missing:
        raise BadLine(f"missing {', '.join(repr(k) for k in missing)}")
    pictures = line_images(path, record)
    return Item(
        id=str(record["id"]),
        images=pictures,
        prompt=str(record["prompt"]),
        answer=str(record["answer"]),
        category=str(record.get("category", "all")),
        extra=dict(record.get("extra", {})),
    )


def load_jsonl(path: Path, skip_bad: bool = False, benchmark: str | None = None) -> Dataset:
    """One JSON object a line: ``id``, ``images`` (paths relative to the file), ``prompt``, ``answer``,
    optional ``category`` and ``extra`` -- the format ``crosstrim testbed data`` writes. Scored by
    :func:`exact_match`; ``skip_bad`` skips (and lists) lines that cannot become items. A benchmark's
    scoring applies to VLMEvalKit TSVs only: naming one is an error."""
    if benchmark is not None:
        raise UserError(
            f"--benchmark chooses how a VLMEvalKit .tsv is scored; {path.name} is JSON lines, scored by exact match"
        )
    items, skipped = [], []
    for _, where, record in json_lines(path):
        try:
            items.append(_jsonl_item(path, record))
        except BadLine as bad:
            if not skip_bad:
                raise UserError(f"{where}: {bad}; fix it, or skip bad lines with --skip-bad") from bad
            index = str(record["id"]) if isinstance(record, dict) and "id" in record else ""
            skipped.append(vlmeval_tsv.Skipped(where, index, str(bad)))
    return Dataset(items, exact_match, skipped=skipped)


def load_vlmeval_tsv(path: Path, skip_bad: bool = False, benchmark: str | None = None) -> Dataset:
    """A VLMEvalKit TSV (:mod:`~crosstrim.evaluation.vlmeval_tsv`) of ``benchmark`` (default: recognised from
    the file name, else its columns or answers): scored per question with the benchmark's answer extraction
    (:func:`~crosstrim.evaluation.vlmeval_metrics.correct`) and officially by
    :func:`~crosstrim.evaluation.vlmeval_metrics.score`."""
    data = vlmeval_tsv.load_tsv(path, benchmark=benchmark, skip_bad=skip_bad)
    return Dataset(
        data.items,
        vlmeval_metrics.correct,
        vlmeval_metrics.score,
        vlmeval_metrics.headline(data.benchmark),
        data.skipped,
        data.benchmark,
        vlmeval_metrics.scored_together,
    )


SOURCES: dict[str, Source] = {
    ".jsonl": Source(load_jsonl, "JSON lines: id, images, prompt, answer[, category]"),
    ".tsv": Source(load_vlmeval_tsv, "VLMEvalKit TSV: MME, POPE, SEEDBench_IMG, MMVP, yes/no or MCQ"),
}


def load(path: str | Path, *, skip_bad: bool = False, benchmark: str | None = None) -> Dataset:
    """The dataset in a file, read by its suffix, scored as ``benchmark`` (a VLMEvalKit name; by default
    recognised from the file); a wrong suffix, an unreadable file, a bad row (unless ``skip_bad``) or no
    items at all is a user error."""
    file = Path(path)
    source = SOURCES.get(file.suffix.lower())
    if source is None:
        known = "; ".join(f"{suffix} ({s.description})" for suffix, s in SOURCES.items())
        raise UserError(f"cannot read {str(file)!r}: unknown dataset format {file.suffix or '(none)'!r}; use {known}")
    if not file.is_file():
        raise UserError(f"dataset file {str(file)!r} does not exist")
    try:
        data = source.load(file, skip_bad, benchmark)
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read {str(file)!r}: not a text file") from err
    if not data.items:
        skipped = f" ({len(data.skipped)} bad rows skipped)" if data.skipped else ""
        raise UserError(f"dataset {str(file)!r} has no items{skipped}")
    return data
