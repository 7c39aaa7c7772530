"""VLMEvalKit benchmark TSVs (MME, POPE, SEEDBench_IMG, MMVP, ...) read as evaluation items, and written.

The layout is VLMEvalKit's (``ImageBaseDataset``): a tab-separated file with a header and one row per
question. Columns:

* ``index``: unique row id;
* ``image``: a base64-encoded image; or, to save space, the ``index`` of another row whose image it
  shares (MME stores each image once for its two questions); or a list literal of base64 strings
  for several images. Files without an ``image`` column name image files in ``image_path`` instead
  (relative to the TSV's folder);
* ``question``, ``answer``; optional ``category``, ``l2-category``, ``hint``, ``image_path``;
* multiple-choice benchmarks: option columns ``A``, ``B``, ``C``, ... (empty where a question has
  fewer options) and the answer is an option letter. Yes/no benchmarks answer ``Yes`` or ``No``.

Prompts are VLMEvalKit's defaults, which its Llama-3.2-Vision wrapper uses for these benchmarks:
the question alone for yes/no; ``Hint/Question/Options/...`` for multiple choice. How answers are
read from generated text and scored is :mod:`crosstrim.evaluation.vlmeval_metrics`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from crosstrim.evaluation import UserError
from crosstrim.evaluation.dataset import Item

# Benchmark name -> kind. Files are recognised by their stem (VLMEvalKit names them after the
# benchmark, e.g. MME.tsv, and MME_local.tsv for its localised copies) or by an explicit name.
BENCHMARKS: dict[str, str] = {
    "MME": "yorn",
    "POPE": "yorn",
    "SEEDBench_IMG": "mcq",
    "MMVP": "mcq",
    "YORN": "yorn",  # any other yes/no benchmark
    "MCQ": "mcq",  # any other multiple-choice benchmark
}
MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
OPTION_LETTERS = string.ascii_uppercase
# The end of every bad-row error: the two ways to go on (crosstrim eval's flag, load_tsv's argument).
_SKIP_HINT = "fix it, or skip bad rows (crosstrim eval --skip-bad; load_tsv(..., skip_bad=True))"
# VLMEvalKit stores an image once and lets other rows name its index instead: short cells are references.
_REFERENCE_MAX_CHARS = 64


@dataclass(frozen=True)
class Skipped:
    """A row that could not become an item: where it is, its index (``""`` if unknown) and why."""

    where: str
    index: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class TsvData:
    """A loaded benchmark: its name, its items, and the rows skipped under ``skip_bad`` (with why)."""

    benchmark: str
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return BENCHMARKS[self.benchmark]


class _BadRow(Exception):
    """A row that cannot become an item; the message says why (the caller adds where)."""


# -- reading ---------------------------------------------------------------------------------------


def benchmark_name(path: str | Path, header: Sequence[str] = (), benchmark: str | None = None) -> str | None:
    """The benchmark a file holds: ``benchmark`` if given, else the file's stem, else its columns.

    Returns ``None`` when only the answers can tell (no option columns: a yes/no file or neither).
    """
    if benchmark is not None:
        found = {name.lower(): name for name in BENCHMARKS}.get(benchmark.lower())
        if found is None:
            raise UserError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        return found
    stem = Path(path).stem
    stem = stem[: -len("_local")] if stem.lower().endswith("_local") else stem
    known = {name.lower(): name for name in BENCHMARKS if name not in ("YORN", "MCQ")}
    if stem.lower() in known:
        return known[stem.lower()]
    if "A" in header and "B" in header:
        return "MCQ"
    return None


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line, row)`` records. A record whose field count differs from the header's
    becomes ``{"__fields__": count}``, so the caller reports it in order with the other bad rows."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed csv's 128 KiB default
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as err:
        raise UserError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
    with handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path.name} is empty; expected a VLMEvalKit TSV with a header row")
            header = [name.strip() for name in header]
            records = []
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                row = dict(zip(header, record)) if len(record) == len(header) else {"__fields__": str(len(record))}
                records.append((reader.line_num, row))
        except csv.Error as err:
            raise UserError(f"{path.name} line {reader.line_num}: not a valid TSV ({err})") from err
        except UnicodeDecodeError as err:
            raise UserError(f"cannot read {str(path)!r}: not UTF-8 text") from err
    return header, records


def _cell(row: Mapping[str, str], column: str) -> str:
    value = row.get(column, "")
    return "" if value is None else value.strip()


def _present(value: str) -> bool:
    """Empty cells are missing (pandas writes NaN as an empty field; it reads "nan" back as NaN)."""
    return bool(value) and value.lower() not in ("nan", "none")


def _image_cells(value: str) -> list[str]:
    """One cell of the ``image`` (or ``image_path``) column as a list: list literals hold several."""
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise _BadRow("image column holds a malformed list") from err
        if not isinstance(parsed, list) or not parsed or not all(isinstance(v, str) for v in parsed):
            raise _BadRow("image column list must hold strings")
        return [v.strip() for v in parsed]
    return [value]


def _decoded(raw: bytes) -> Image.Image:
    """Check that ``raw`` decodes fully, then return it opened lazily (pixels decode when first used).

    Opening lazily keeps a large benchmark at its compressed size in memory until an image is
    answered; a truncated or corrupt file is still caught here, at load time.
    """
    # Some libraries (lmms-eval, for one) set PIL's process-wide LOAD_TRUNCATED_IMAGES, which turns a
    # truncated file into a silently grey-padded image; the check insists on complete files.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            probe.load()
        return Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise _BadRow("image is not a decodable image") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


class _Images:
    """Resolves image cells (base64, references to other rows, files) to images, each decoded once."""

    def __init__(self, path: Path, by_index: Mapping[str, str], column: str) -> None:
        self.path = path
        self.by_index = by_index
        self.column = column
        self.cache: dict[str, Image.Image] = {}

    def resolve(self, value: str, index: str) -> tuple[tuple[Image.Image, ...], str]:
        """The images of row ``index``'s cell, and a key naming where they come from: the row that holds
        them (``index 12``) or the file. Questions on one image share the key (MME pairs them by it)."""
        if not _present(value):
            raise _BadRow(f"{self.column} is empty")
        cells = _image_cells(value)
        images, sources = [], []
        for number, cell in enumerate(cells):
            if self.column == "image_path":
                key = f"file {cell}"
            elif len(cell) <= _REFERENCE_MAX_CHARS:
                target = self.by_index.get(cell)
                if target is None:
                    raise _BadRow(f"image refers to index {cell!r}, which no row has")
                if len(target) <= _REFERENCE_MAX_CHARS or target.startswith("["):
                    raise _BadRow(f"image refers to index {cell!r}, whose image is not a single base64 image")
                key, cell = f"index {cell}", target
            else:
                key = f"index {index}" + (f" image {number + 1}" if len(cells) > 1 else "")
            if key not in self.cache:
                self.cache[key] = _decoded(self._bytes(cell))
            images.append(self.cache[key])
            sources.append(key)
        return tuple(images), " + ".join(sources)

    def _bytes(self, cell: str) -> bytes:
        if self.column == "image_path":
            file = Path(cell) if Path(cell).is_absolute() else self.path.parent / cell
            try:
                return file.read_bytes()
            except OSError as err:
                raise _BadRow(f"cannot read image file {str(file)!r}") from err
        try:
            return base64.b64decode("".join(cell.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise _BadRow("image is not valid base64") from err


def mcq_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's default multiple-choice prompt (``ImageMCQDataset.build_prompt``)."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{key}. {text}\n" for key, text in options.items())
        prompt += MCQ_INSTRUCTION
    return prompt


def _yes_no_answer(value: str) -> str:
    answer = {"yes": "Yes", "no": "No"}.get(value.lower())
    if answer is None:
        raise _BadRow(f"answer {value!r} is not Yes or No")
    return answer


def load_tsv(path: str | Path, *, benchmark: str | None = None, skip_bad: bool = False) -> TsvData:
    """Read a VLMEvalKit TSV into :class:`Item` objects (``id`` is the row's ``index``).

    Args:
        path: the ``.tsv`` file.
        benchmark: one of :data:`BENCHMARKS`; by default recognised from the file name, else from
            the columns (option columns: multiple choice; Yes/No answers: yes/no).
        skip_bad: skip rows that cannot become items (wrong field count, empty or duplicate index,
            missing question or answer, an answer that is not an option, an image that is not base64
            or does not decode, a reference to a missing row) and list them in ``skipped`` (as
            :class:`Skipped`), instead of stopping at the first one. Missing columns are always an error.

    Raises:
        UserError: naming the file, line and index of the first bad row (without ``skip_bad``), a
            missing column, or a file with no usable row.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"dataset file {str(file)!r} does not exist")
    header, records = _read_table(file)
    name = benchmark_name(file, header, benchmark)
    image_column = "image" if "image" in header else "image_path"
    required = ["index", "question", "answer", image_column]
    if name is not None and BENCHMARKS[name] == "mcq":
        required += ["A", "B"]
    if name == "MME":
        required.append("category")
    missing = [column for column in required if column not in header]
    if image_column not in header:
        missing[missing.index("image_path")] = "image (or image_path)"
    if missing:
        raise UserError(
            f"{file.name} has no {', '.join(repr(m) for m in missing)} column{'s' if len(missing) > 1 else ''}; "
            f"a VLMEvalKit TSV has index, image, question, answer[, A, B, ...][, category] (found: {', '.join(header)})"
        )
    if name is None:
        answers = {_cell(row, "answer").lower() for _, row in records if "__fields__" not in row}
        if answers and answers <= {"yes", "no"}:
            name = "YORN"
        else:
            raise UserError(
                f"cannot tell which benchmark {file.name} holds (no option columns, answers not Yes/No); "
                f"name it after one of {', '.join(BENCHMARKS)} or pass the benchmark explicitly"
            )
    kind = BENCHMARKS[name]
    options_in_file = [letter for letter in OPTION_LETTERS if letter in header]
    by_index = {_cell(row, "index"): _cell(row, "image") for _, row in records if "__fields__" not in row}
    images = _Images(file, by_index, image_column)
    items: list[Item] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for number, (line, row) in enumerate(records, start=1):
        index = _cell(row, "index")
        where = f"{file.name} row {number} (line {line}" + (f", index {index})" if index else ")")
        try:
            if "__fields__" in row:
                raise _BadRow(f"has {row['__fields__']} tab-separated fields, the header has {len(header)}")
            if not index:
                raise _BadRow("index is empty")
            if index in seen:
                raise _BadRow("index repeats an earlier row's")
            items.append(_item(row, index, name, kind, options_in_file, images))
            seen.add(index)
        except _BadRow as bad:
            if not skip_bad:
                raise UserError(f"{where}: {bad}; {_SKIP_HINT}") from bad
            skipped.append(Skipped(where, index, str(bad)))
    if not items:
        raise UserError(f"{file.name} has no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return TsvData(name, items, skipped)


def _item(row: Mapping[str, str], index: str, name: str, kind: str, letters: Sequence[str], images: _Images) -> Item:
    question = _cell(row, "question")
    if not _present(question):
        raise _BadRow("question is empty")
    answer = _cell(row, "answer")
    if not _present(answer):
        raise _BadRow("answer is empty")
    pictures, source = images.resolve(_cell(row, images.column), index)
    category = _cell(row, "category") if _present(_cell(row, "category")) else ""
    extra: dict = {"benchmark": name, "question": question, "image_source": source}
    if _present(_cell(row, "image_path")):
        extra["image_path"] = _cell(row, "image_path")
    if _present(_cell(row, "l2-category")):
        extra["l2-category"] = _cell(row, "l2-category")
    if kind == "mcq":
        options = {letter: _cell(row, letter) for letter in letters if _present(_cell(row, letter))}
        if len(options) < 2:
            raise _BadRow(f"has {len(options)} option(s); a multiple-choice row needs at least A and B")
        answer = answer.upper()
        if answer not in options:
            raise _BadRow(f"answer {answer!r} is not one of its options {', '.join(options)}")
        hint = _cell(row, "hint")
        prompt = mcq_prompt(question, options, hint if _present(hint) else None)
        extra["options"] = options
    else:
        answer = _yes_no_answer(answer)
        prompt = question
    if name == "MME" and not category:
        raise _BadRow("category is empty (MME scores per category)")
    return Item(id=index, images=pictures, prompt=prompt, answer=answer, category=category, extra=extra)


# -- writing (fixtures, conversions) -------------------------------------------------------------


def encode_image(image: Image.Image, format: str = "PNG") -> str:
    """An image as VLMEvalKit stores it: base64 of the encoded file."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_tsv(path: str | Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Write rows (dicts; the union of their keys, in first-seen order, is the header) as a VLMEvalKit TSV.

    PIL images in ``image`` are base64-encoded; lists of images become list literals.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    file = Path(path)
    with file.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            cells = []
            for column in columns:
                value = row.get(column, "")
                if isinstance(value, Image.Image):
                    value = encode_image(value)
                elif isinstance(value, (list, tuple)):
                    value = repr([encode_image(v) if isinstance(v, Image.Image) else str(v) for v in value])
                cells.append("" if value is None else str(value))
            writer.writerow(cells)
    return file


__all__ = [
    "BENCHMARKS",
    "Skipped",
    "TsvData",
    "benchmark_name",
    "encode_image",
    "load_tsv",
    "mcq_prompt",
    "write_tsv",
]
