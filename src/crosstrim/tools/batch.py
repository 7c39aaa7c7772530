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

Beside ``--out`` (say ``answers.jsonl``) live ``answers.jsonl.settings.json``, what produced the answers
(a resume with other settings would mix two runs' answers, so it is refused), and ``answers.jsonl.lock``,
which the run holds so that a second run on the same output is refused instead of answering everything twice.

With ``--memory-budget GB`` the batch size is the largest whose run keeps this process's peak memory
(resident set on CPU, allocated on GPU) within the budget: what the process holds once the model is
loaded, plus per request its KV cache (from the memory model, :mod:`crosstrim.engine.memory`: the longest
request's prompt plus ``--max-new-tokens``, the most images any request has, every tile) and its
inputs, plus the peak of one prefill micro-batch, measured on the first requests. The prefill runs
``--prefill-batch-size`` requests at a time through :func:`crosstrim.generate`, so its activations
(vision encoder, projected features, the first cross layer's full K/V) grow with that, not with the
batch.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
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
from crosstrim.engine.memory import format_bytes
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import GREEDY, answer_texts, encode, greedy
from crosstrim.testbed import CHECKPOINT, prompt_warning, unknown_words

GB = 1e9
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Request:
    """One row of the requests file: where it is (file name and line, for messages), its id, image files
    and prompt."""

    file: str
    line: int
    id: object
    images: tuple[Path, ...]
    prompt: str

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line} (id {self.id!r})"


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
    totals = Totals()
    with contextlib.ExitStack() as stack:
        lock_output(stack, out, Path(args.requests))  # before the model loads: an 11B load takes minutes
        done = read_answers(out, {str(r.id) for r in requests})
        check_settings(out, run_settings(args, config), answered=bool(done))
        for row in done.values():
            totals.add(row)
        pending = [r for r in requests if str(r.id) not in done]
        try:
            if pending:
                bad = answer_all(args, config, pending, out, totals, bad)
        except KeyboardInterrupt:
            print(
                f"crosstrim batch: interrupted; {totals.rows} of {total} requests are answered in {out}; "
                "run the same command again to answer the rest",
                file=sys.stderr,
            )
            return 130
    print(f"answered {totals.rows} of {total} requests into {out}" + (f"; {totals}" if totals.valid else ""))
    if bad:
        print(f"skipped {len(bad)} bad row{'s' if len(bad) > 1 else ''}:", file=sys.stderr)
        for row in bad:
            print(f"  {row}", file=sys.stderr)
    return 0


def lock_output(stack: contextlib.ExitStack, out: Path, requests: Path) -> None:
    """Check that ``out`` can take answers and lock it for this run (held until ``stack`` closes).

    Two runs appending to one file would answer every request twice, so the second is refused: it cannot
    take the exclusive ``flock`` on ``OUT.lock`` the first holds (released by the kernel when a run ends,
    however it ends). Every problem is found here, before the model loads.
    """
    if out.exists() and requests.exists() and os.path.samefile(out, requests):
        raise UserError(f"--out {str(out)!r} is the requests file; pass another file for the answers")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; pass a file path such as {str(out / 'answers.jsonl')!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UserError(f"--out {str(out)!r} lies under a file, not a folder; pass another path") from err
    except OSError as err:
        raise UserError(f"cannot create the folder of --out {str(out)!r}: {err.strerror}") from err
    lock_path = _beside(out, ".lock")
    try:
        lock = stack.enter_context(lock_path.open("a"))
    except OSError as err:
        raise UserError(
            f"cannot write in the folder of --out {str(out)!r} ({err.strerror}); pass another path"
        ) from err
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        raise UserError(
            f"another crosstrim batch is writing {str(out)!r} (it holds {str(lock_path)!r}); "
            "wait for it to finish, or answer into another --out"
        ) from err
    try:
        with out.open("ab"):
            pass
    except OSError as err:
        raise UserError(f"cannot write --out {str(out)!r}: {err.strerror}") from err


def _beside(out: Path, suffix: str) -> Path:
    """The file beside ``out`` (its real location, when ``out`` is a link) named ``out``'s name + ``suffix``."""
    real = out.resolve()
    return real.with_name(real.name + suffix)


def run_settings(args: argparse.Namespace, config: TrimConfig) -> dict:
    """What decides the answers, recorded beside them: the model (its folder and a digest of its files),
    the dtype, the trimming, the generate settings and crosstrim's version. Batch sizes and threads are
    left out: they change how fast answers come, not which."""
    device = checkpoint.resolve_device(args.device)
    folder = Path(args.model) if args.model else CHECKPOINT
    return {
        "model": str(folder.resolve()) if args.model else "testbed",
        "model files": _digest(folder),
        "dtype": str(checkpoint.resolve_dtype(args.dtype, device)).removeprefix("torch."),
        "trimming": {name: getattr(config, name) for name in options.TRIM_FLAGS},
        "generate": {"max_new_tokens": args.max_new_tokens, **GREEDY},
        "crosstrim": crosstrim.__version__,
    }


def _flat(settings: dict, prefix: str = "") -> dict:
    """``{"trimming": {"k_ratio": 0.05}}`` as ``{"trimming k_ratio": 0.05}``, so a difference names its field."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key} ")
        else:
            flat[prefix + key] = value
    return flat


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _digest(folder: Path) -> str:
    """A digest of a checkpoint folder: every file's name, the contents of the small ones (config,
    generation config, tokenizer) and the size of the weight files (hashing gigabytes would take minutes).
    Hidden files (a download tool's ``.cache``, locks) are left out: they change without the model changing."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(str(path.stat().st_size).encode())
        else:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def check_settings(out: Path, settings: dict, answered: bool) -> None:
    """Refuse to add answers to ``out`` made with other settings than the answers in it (resuming
    would mix them silently); record the settings of a new or empty output in ``OUT.settings.json``."""
    path = _beside(out, ".settings.json")
    if answered:
        if not path.is_file():
            raise UserError(
                f"{str(out)!r} holds answers but no record of what produced them ({path.name} is missing); "
                "answer into a new --out"
            )
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {str(path)!r}, the settings of {str(out)!r}: {err}") from err
        before, now = _flat(recorded), _flat(settings)
        differences = [f"{key} {before.get(key)} -> {value}" for key, value in now.items() if before.get(key) != value]
        if differences:
            raise UserError(
                f"{str(out)!r} holds answers made with other settings ({'; '.join(differences)}); resuming would "
                f"mix them: answer into a new --out, or remove {str(out)!r} and {path.name} to start over"
            )
        return
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as err:
        raise UserError(f"cannot write {str(path)!r}: {err.strerror}") from err


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
    unknown = [r for r in pending if unknown_words(r.prompt)] if args.model is None else []
    if unknown:
        print(
            f"crosstrim batch: warning: {len(unknown)} request{'s' if len(unknown) > 1 else ''} use words the "
            f"testbed does not know; {unknown[0].where}: {prompt_warning(unknown[0].prompt)}",
            file=sys.stderr,
        )
    positions = model.config.text_config.max_position_embeddings
    with out.open("ab", buffering=0) as sink, progress_bar() as bar, crosstrim.trimmed(model, config) as handle:
        task = bar.add_task("answering", total=len(pending), note="")
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            ready, images = [], []
            for request in batch:
                try:
                    pictures = tuple(checkpoint.load_image(path) for path in request.images)
                    text = checkpoint.format_prompt(processor, request.prompt, len(pictures))
                    check_length(processor, text, args.max_new_tokens, positions)
                except UserError as err:
                    bad = _bad(bad, BadRow(request.where, str(err)), args.skip_bad)
                    continue
                ready.append(request)
                images.append(pictures)
            rows = answer(model, processor, handle, ready, images, args) if ready else []
            try:
                append(sink, rows)
            except OSError as err:
                raise UserError(
                    f"cannot write answers to {str(out)!r}: {err.strerror}; the {totals.rows} answers before "
                    "are kept, and running the same command again answers the rest"
                ) from err
            for row in rows:
                totals.add(row)
            bar.update(task, advance=len(batch), note=f"kept {totals.kept_share:.0%}" if totals.valid else "")
    return bad


def append(sink, rows: list[dict]) -> None:
    """Append one batch's answers to the unbuffered ``sink`` and make them durable (fsync) before the next
    batch starts, so a crash or a kill loses at most the batch being answered. Unbuffered: a failed write
    (disk full, file-size limit) leaves nothing behind to be flushed again at close."""
    data = memoryview("".join(json.dumps(row) + "\n" for row in rows).encode())
    while data:
        data = data[sink.write(data) :]
    os.fsync(sink.fileno())


def check_length(processor, text: str, max_new_tokens: int, positions: int) -> None:
    """Refuse a prompt that, with ``--max-new-tokens``, needs more positions than the model has
    (``text_config.max_position_embeddings``): past them its answer is not what the model was trained for."""
    tokens = len(processor.tokenizer(text)["input_ids"])
    if tokens + max_new_tokens > positions:
        raise UserError(
            f"the prompt is {tokens} tokens, and with --max-new-tokens {max_new_tokens} needs "
            f"{tokens + max_new_tokens} positions; the model has {positions} (max_position_embeddings): "
            "shorten the prompt or lower --max-new-tokens"
        )


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
            f"kept {self.kept_share:.1%} of image tokens; cross-attention KV {format_bytes(self.kv_full)} -> "
            f"{format_bytes(self.kv_kept)} ({saved:.0%} saved; each request counted alone, no batch padding)"
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
    return Request(path.name, number, record["id"], files, record["prompt"])


def read_answers(path: Path, known: set[str]) -> dict[str, dict]:
    """The answers already in ``path``, by id.

    A last line cut off mid-write (an interrupted run) is cut off the file, and nothing else is
    rewritten, so its request is answered again and a failure here cannot lose a stored answer; a
    complete last line without its newline counts as an answer and gets the newline. Any other line
    that is not an answer (no ``id`` or ``answer``), an id of another requests file, and an id answered
    twice (``7`` and ``"7"`` are one id: ids are compared as text) are errors.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
    try:
        if tail.strip() and _is_json(tail):
            complete.append(tail)
            with path.open("ab") as sink:
                sink.write(b"\n")
        elif tail:
            os.truncate(path, len(data) - len(tail))
            if tail.strip():
                print(
                    f"crosstrim batch: dropped an incomplete last line of {path}; answering it again", file=sys.stderr
                )
    except OSError as err:
        raise UserError(f"cannot repair the last line of {str(path)!r} ({err.strerror}); its answers are kept") from err
    done: dict[str, dict] = {}
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = str(row["id"])
            if not isinstance(row["answer"], str):
                raise TypeError("the answer is not a string")
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise UserError(
                f"{path} line {number} is not an answer row (id, answer, ...); pass another --out or remove it"
            ) from err
        if key not in known:
            raise UserError(
                f"{path} line {number} answers id {row['id']!r}, which is not in the requests; "
                "is --out the answers of another requests file?"
            )
        if key in done:
            raise UserError(
                f"{path} line {number} answers id {row['id']!r} again; two runs wrote into one --out: "
                "keep one line per id (or answer into a new --out)"
            )
        done[key] = row
    return done


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def budget_batch_size(model, processor, requests: list[Request], config: TrimConfig, args) -> tuple[int, str]:
    """The largest batch whose run fits ``--memory-budget`` (this process's peak), and a line saying how.

    ``held + B * (kv + inputs) + transient <= budget``, the bench's capacity model
    (:class:`crosstrim.bench.capacity.Footprint`), every term for this process as it runs:

    * ``held``: what the process holds now, weights and runtime (resident set on CPU, allocated on GPU);
    * ``kv``: one request's KV cache, sized for the worst request: the longest prompt (in tokens,
      images included) plus ``--max-new-tokens``, the most images, every tile. Cross layers the trim
      leaves untrimmed hold every image token; trimmed ones ``ceil(keep_ratio * tokens)`` per image
      (plus one summary token with ``--summarize-dropped``). ``--k-ratio`` keeps an input-dependent
      share (the union of per-head top-k) known only after the prefill, so it is planned as keeping
      everything: use ``--keep-ratio`` for a batch that grows with trimming;
    * ``inputs``: one request's processor outputs (pixel values of the most images), held on the CPU;
    * ``transient``: one prefill micro-batch's peak above its inputs (vision encoder, projected features,
      the first cross layer's full K/V, and its own cache, which exists beside the whole batch's until
      copied in), measured on the first ``--prefill-batch-size`` requests (one token generated, answers
      discarded).
    """
    from crosstrim.bench.capacity import Footprint
    from crosstrim.bench.measure import peak, reset_peak

    mm = memory.MemoryModel.from_config(model.config)
    dtype = model.dtype
    usable = []
    for request in requests:
        try:
            pictures = tuple(checkpoint.load_image(path) for path in request.images)
            checkpoint.format_prompt(processor, request.prompt, len(pictures))
        except UserError:
            continue  # reported, or skipped with --skip-bad, when its batch runs
        usable.append(Item(str(request.id), pictures, request.prompt, "", ""))
    if not usable:
        return 1, "--memory-budget: no readable request to plan with; batch 1"
    texts = [checkpoint.format_prompt(processor, item.prompt, len(item.images)) for item in usable]
    text_tokens = max(len(ids) for ids in processor.tokenizer(texts)["input_ids"]) + args.max_new_tokens
    images = max(len(item.images) for item in usable)
    ratio = 1.0 if config.is_identity or config.keep_ratio is None else config.keep_ratio
    kv = mm.kv_bytes(
        dtype, text_tokens=text_tokens, images=images, r=ratio, trim_first_layer_cache=config.trim_first_layer_cache
    ).total
    if config.summarize_dropped and ratio < 1.0:
        kv += images * mm.trimmed_layers() * mm.kv_bytes_per_token(dtype)
    widest = max(usable, key=lambda item: len(item.images))
    inputs = sum(t.nbytes for t in encode(processor, [widest], "cpu").values()) if model.device.type == "cpu" else 0
    n = min(args.prefill_batch_size, len(usable))
    calibration = encode(processor, usable[:n], "cpu")
    held = reset_peak(model.device)
    with crosstrim.trimmed(model, config):
        crosstrim.generate(model, prefill_batch_size=n, **calibration, **greedy(processor, 1))
    measured = peak(model.device)
    del calibration
    # The calibration's own cache stays in its transient: in a batch, each micro-batch's cache exists beside the
    # whole batch's until it is copied in (crosstrim.generate), on top of B caches.
    fp = Footprint(held=held, kv=kv, inputs=inputs, transient=max(0, measured - held - n * inputs))
    budget = args.memory_budget * GB
    size = fp.largest_batch(budget)
    terms = (
        f"held {format_bytes(held)} + B x ({format_bytes(kv)} KV + {format_bytes(inputs)} inputs) + transient "
        f"{format_bytes(fp.transient)}"
    )
    if size < 1:
        raise UserError(f"--memory-budget {args.memory_budget:g} GB holds no request: {terms}")
    assumed = "k_ratio planned as keeping every token; " if config.k_ratio is not None and ratio == 1.0 else ""
    plan = (
        f"batch {size} from --memory-budget {args.memory_budget:g} GB: {terms} (predicted peak "
        f"{format_bytes(fp.peak(size))}; {text_tokens} text tokens, {images} image(s), {assumed}kept share {ratio:g})"
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
