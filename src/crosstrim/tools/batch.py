"""``crosstrim batch``: answer a JSONL file of requests offline, as many at once as a memory budget allows.

Requests, one JSON object a line (image paths relative to the file)::

    {"id": "cat-1", "images": ["photos/cat.jpg"], "prompt": "What is the cat doing?"}

Answers, appended one line per request as each batch finishes (so an interrupted run resumes
where it stopped: ids already in ``--out`` are skipped, a last line cut off mid-write is dropped
and answered again)::

    {"id": "cat-1", "answer": "...", "kept": 412, "valid": 1028, "kv_bytes_full": ..., "kv_bytes_kept": ...}

``kept`` / ``valid`` count the request's image tokens kept by trimming / not padding; the KV
bytes are its cross-attention cache untrimmed and trimmed, run alone (no padding of any kind), so
they do not depend on the batch the request came in.

With ``--memory-budget GB`` the batch size comes from the memory model (:mod:`crosstrim.engine.memory`):
the largest batch whose weights plus KV cache (the longest request's prompt plus
``--max-new-tokens``, the most images any request has, every tile) fit the budget. The prefill runs
``--prefill-batch-size`` requests at a time through :func:`crosstrim.generate`, so its activations
(vision encoder, projected features, the first cross layer's full K/V) grow with that, not with the
batch; they come on top of the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import crosstrim
from crosstrim.cli import options
from crosstrim.cli.options import load_model, progress_bar
from crosstrim.core import TrimConfig
from crosstrim.engine import memory
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import answer_texts, encode, greedy

GB = 1e9
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Request:
    """One row of the requests file: where it is (for messages), its id, image files and prompt."""

    line: int
    id: object
    images: tuple[Path, ...]
    prompt: str

    @property
    def where(self) -> str:
        return f"line {self.line} (id {self.id!r})"


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be answered: where it is and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="answer a JSONL file of requests, batched to a memory budget, resumable"
    )
    options.add_model_arguments(parser)
    parser.add_argument("--requests", required=True, metavar="FILE.jsonl", help="id, images, prompt per line")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl", help="answers, appended; resumed if present")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--memory-budget", type=float, metavar="GB", help="pick the batch size: weights + KV cache within GB (1e9 B)"
    )
    size.add_argument("--batch-size", type=int, help=f"requests decoded together (default {DEFAULT_BATCH})")
    parser.add_argument(
        "--prefill-batch-size", type=int, default=1, help="requests prefilled at once (default 1: lowest peak)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip-bad", action="store_true", help="skip rows that cannot be answered and list them")
    options.add_trim_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = options.trim_config(args)
    for name in ("batch_size", "prefill_batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory_budget is not None and not (math.isfinite(args.memory_budget) and args.memory_budget > 0):
        raise UserError("--memory-budget must be a positive number of GB")
    requests, bad = read_requests(Path(args.requests), args.skip_bad)
    total = len(requests) + len(bad)
    out = Path(args.out)
    done = read_answers(out, {str(r.id) for r in requests})
    totals = Totals()
    for row in done.values():
        totals.add(row)
    pending = [r for r in requests if str(r.id) not in done]
    if pending:
        bad = answer_all(args, config, pending, out, totals, bad)
    print(f"answered {totals.rows} of {total} requests into {out}" + (f"; {totals}" if totals.valid else ""))
    if bad:
        print(f"skipped {len(bad)} bad row{'s' if len(bad) > 1 else ''}:", file=sys.stderr)
        for row in bad:
            print(f"  {row}", file=sys.stderr)
    return 0


def answer_all(args, config: TrimConfig, pending: list[Request], out: Path, totals: Totals, bad: list) -> list:
    """Answer ``pending`` batch by batch, appending each batch's answers to ``out`` as it finishes."""
    model, processor, name = load_model(args.model, args.device, args.dtype)
    batch_size = args.batch_size or DEFAULT_BATCH
    if args.memory_budget is not None:
        batch_size, plan = budget_batch_size(model, processor, pending, config, args)
        print(plan, file=sys.stderr)
    print(
        f"model: {name}; trimming: {config.describe()}; {len(pending)} to answer ({totals.rows} already in "
        f"{out}); batch {batch_size}, prefill {args.prefill_batch_size} at a time",
        file=sys.stderr,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink, progress_bar() as bar, crosstrim.trimmed(model, config) as handle:
        task = bar.add_task("answering", total=len(pending), note="")
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            ready, images = [], []
            for request in batch:
                try:
                    pictures = tuple(checkpoint.load_image(path) for path in request.images)
                    checkpoint.format_prompt(processor, request.prompt, len(pictures))
                except UserError as err:
                    bad = _bad(bad, BadRow(request.where, str(err)), args.skip_bad)
                    continue
                ready.append(request)
                images.append(pictures)
            for row in answer(model, processor, handle, ready, images, args) if ready else []:
                sink.write(json.dumps(row) + "\n")
                totals.add(row)
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(task, advance=len(batch), note=f"kept {totals.kept_share:.0%}" if totals.valid else "")
    return bad


class Totals:
    """Running sums over the answers in the output: kept share and cross-attention KV saved."""

    def __init__(self) -> None:
        self.rows = self.kept = self.valid = self.kv_full = self.kv_kept = 0

    def add(self, row: dict) -> None:
        self.rows += 1
        self.kept += row.get("kept") or 0
        self.valid += row.get("valid") or 0
        self.kv_full += row.get("kv_bytes_full") or 0
        self.kv_kept += row.get("kv_bytes_kept") or 0

    @property
    def kept_share(self) -> float:
        return self.kept / self.valid if self.valid else 1.0

    def __str__(self) -> str:
        saved = 1 - self.kv_kept / self.kv_full if self.kv_full else 0.0
        return (
            f"kept {self.kept_share:.1%} of image tokens; cross-attention KV {self.kv_full / 1e6:.2f} MB -> "
            f"{self.kv_kept / 1e6:.2f} MB ({saved:.0%} saved; each request counted alone, no batch padding)"
        )


def _bad(bad: list[BadRow], row: BadRow, skip_bad: bool) -> list[BadRow]:
    if not skip_bad:
        raise UserError(f"{row}; fix the row (answers so far are kept), or skip bad rows with --skip-bad")
    return [*bad, row]


def read_requests(path: Path, skip_bad: bool) -> tuple[list[Request], list[BadRow]]:
    """Every request of the file, checked without decoding images (a missing image file is caught here,
    an undecodable one when its batch loads); duplicate ids are refused, since resuming goes by id."""
    if not path.is_file():
        raise UserError(f"requests file {str(path)!r} does not exist")
    requests, bad, seen = [], [], {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read {str(path)!r}: not a text file") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            request = _request(path, number, line)
        except ValueError as err:
            bad = _bad(bad, BadRow(where, str(err)), skip_bad)
            continue
        if str(request.id) in seen:
            raise UserError(f"{where}: id {request.id!r} repeats line {seen[str(request.id)]}; ids must be unique")
        seen[str(request.id)] = number
        requests.append(request)
    if not requests:
        raise UserError(f"{str(path)!r} has no requests" + (f" ({len(bad)} bad rows skipped)" if bad else ""))
    return requests, bad


def _request(path: Path, number: int, line: str) -> Request:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg}); expected one object per line: id, images, prompt") from err
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with id, images, prompt; got {type(record).__name__}")
    missing = [key for key in ("id", "images", "prompt") if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(repr(k) for k in missing)}")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise ValueError("'id' must be a string or an integer")
    images = record["images"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise ValueError("'images' must be a non-empty list of image paths (relative to the requests file)")
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise ValueError("'prompt' must be a non-empty string")
    files = tuple(path.parent / p for p in images)
    for file in files:
        if not file.is_file():
            raise ValueError(f"image {str(file)!r} does not exist")
    return Request(number, record["id"], files, record["prompt"])


def read_answers(path: Path, known: set[str]) -> dict[str, dict]:
    """The answers already in ``path``, by id. A last line cut off mid-write (an interrupted run) is
    removed so its request is answered again; any other unreadable line is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
    if tail.strip():
        try:
            json.loads(tail)
            complete.append(tail)
            data += b"\n"
        except json.JSONDecodeError:
            data = data[: len(data) - len(tail)]
            print(f"crosstrim batch: dropped an incomplete last line of {path}; answering it again", file=sys.stderr)
        path.write_bytes(data)
    done = {}
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = str(row["id"])
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise UserError(f"{path} line {number} is not an answer row; pass another --out or remove it") from err
        if key not in known:
            raise UserError(
                f"{path} line {number} answers id {row['id']!r}, which is not in the requests; "
                "is --out the answers of another requests file?"
            )
        done[key] = row
    return done


def budget_batch_size(model, processor, requests: list[Request], config: TrimConfig, args) -> tuple[int, str]:
    """The largest batch whose weights plus KV cache fit ``--memory-budget``, and a line saying how.

    The KV cache is sized for the worst request: the longest prompt (in tokens, images included)
    plus ``--max-new-tokens``, the most images, every tile. Cross layers the trim leaves untrimmed hold
    every image token; trimmed ones ``ceil(keep_ratio * tokens)`` per image (plus one summary token
    with ``--summarize-dropped``). ``--k-ratio`` keeps an input-dependent share (the union of per-head
    top-k) that is only known after the prefill, so it is planned as keeping everything: use
    ``--keep-ratio`` for a batch that grows with trimming.
    """
    mm = memory.MemoryModel.from_config(model.config)
    dtype = model.dtype
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    texts = []
    for request in requests:
        try:
            texts.append(checkpoint.format_prompt(processor, request.prompt, len(request.images)))
        except UserError:
            continue  # reported, or skipped with --skip-bad, when its batch runs
    text_tokens = max((len(ids) for ids in processor.tokenizer(texts)["input_ids"]), default=0) + args.max_new_tokens
    images = max(len(r.images) for r in requests)
    ratio = 1.0 if config.is_identity or config.keep_ratio is None else config.keep_ratio
    kv = mm.kv_bytes(
        dtype, text_tokens=text_tokens, images=images, r=ratio, trim_first_layer_cache=config.trim_first_layer_cache
    ).total
    if config.summarize_dropped and ratio < 1.0:
        kv += images * mm.trimmed_layers() * mm.kv_bytes_per_token(dtype)
    budget = args.memory_budget * GB
    size = math.floor((budget - weights) / kv)
    if size < 1:
        raise UserError(
            f"--memory-budget {args.memory_budget:g} GB holds no request: weights {weights / GB:.2f} GB + one "
            f"request's KV cache {kv / GB:.3f} GB"
        )
    assumed = "k_ratio planned as keeping every token; " if config.k_ratio is not None and ratio == 1.0 else ""
    plan = (
        f"batch {size} from --memory-budget {args.memory_budget:g} GB: weights {weights / GB:.2f} GB + "
        f"{size} x {kv / 1e6:.1f} MB KV per request ({text_tokens} text tokens, {images} image(s), "
        f"{assumed}kept share {ratio:g})"
    )
    return size, plan


def answer(model, processor, handle, requests: list[Request], images: list[tuple], args) -> list[dict]:
    """Greedy answers of one batch, through the micro-batched prefill, with what trimming kept for each."""
    items = [Item(str(r.id), pictures, r.prompt, "", "") for r, pictures in zip(requests, images)]
    inputs = encode(processor, items, "cpu")  # crosstrim.generate moves each prefill slice to the model
    tokens = crosstrim.generate(
        model, prefill_batch_size=args.prefill_batch_size, **inputs, **greedy(processor, args.max_new_tokens)
    )
    texts = answer_texts(processor, tokens, inputs)
    stats = handle.stats
    rows = []
    for b, (request, text) in enumerate(zip(requests, texts)):
        full, kept = stats.sample_kv_bytes(b)  # the request run alone: not what its batch added
        rows.append(
            {
                "id": request.id,
                "answer": text,
                "kept": stats.kept_counts[b],
                "valid": stats.valid_counts[b],
                "kv_bytes_full": full,
                "kv_bytes_kept": kept,
            }
        )
    return rows


__all__ = ["register", "run"]
