"""Choosing a trimming ratio without labels: how often does a trimmed model say what the full one says?

A user has a checkpoint and their own requests, not a labelled benchmark. Calibration answers every
request with the untrimmed model once and with each candidate setting, and measures per setting

* **agreement**: the share of requests whose greedy answer (the whole generated text) is exactly the
  full model's, with a Wilson score interval (it stays inside [0, 1] and is honest at 0 or n
  successes, where the normal approximation claims zero width);
* **divergence of the first answer token**: the total variation distance between the full and the
  trimmed model's next-token distributions at the first generated position (half the L1 distance: the
  probability mass that moves, in [0, 1]) and KL(full || trimmed), both averaged over requests. They
  show how close a setting is to flipping answers before it flips them;
* the kept share of image tokens and the cross-attention KV cache per request.

:func:`recommend` picks the setting that keeps the least whose agreement meets the user's target with
confidence: the **lower end of the Wilson interval** must reach the target, not the point estimate.
Picking the least-kept setting among many whose point estimate passes favours settings that were
lucky on this sample (the winner's curse), and the recommendation is meant to hold on requests it
did not see. The price is that a small calibration set recommends conservatively, or nothing.

Every setting answers the same batches as the full model, one batch at a time, so the first-token
distributions are compared within a batch and never stored for the whole set (a real checkpoint's
vocabulary is 128k wide).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import crosstrim
from crosstrim.evaluation import UserError, checkpoint, distributed, sources
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import answer_texts, batches, encode, greedy
from crosstrim.evaluation.sweep import Setting, wilson_interval

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class Answer:
    """What one setting did with one request (``kept``/``valid`` are image tokens)."""

    text: str
    kept: int
    valid: int
    kv_bytes_full: int
    kv_bytes_kept: int
    total_variation: float
    kl: float


@dataclass(frozen=True)
class RequestRecord:
    """One request: the full model's answer and every setting's, keyed by the setting's label."""

    id: str
    full: str
    answers: dict[str, Answer] = field(default_factory=dict)


@dataclass(frozen=True)
class SettingResult:
    """A setting summarised over all requests."""

    label: str
    family: str
    config: dict
    items: int
    agree: int
    agreement: float
    agreement_low: float
    agreement_high: float
    total_variation: float
    kl: float
    kept_fraction: float
    kept_fraction_std: float
    kv_bytes_full: float
    kv_bytes_kept: float
    meets_target: bool


def first_token_divergence(full_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``(B, V)`` logits: total variation distance and KL(full || other) of the softmaxes.

    Computed from log-softmax in float32, so KL stays finite where a probability underflows.
    """
    log_p = torch.log_softmax(full_logits.float(), dim=-1)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    total_variation = 0.5 * (p - q).abs().sum(-1)
    kl = (p * (log_p - log_q)).sum(-1).clamp(min=0.0)
    return total_variation, kl


def _answer(model, processor, inputs, max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
    """Greedy texts of a batch and the raw logits of its first generated token ``(B, V)``."""
    with torch.no_grad():
        out = model.generate(
            **inputs, **greedy(processor, max_new_tokens), output_logits=True, return_dict_in_generate=True
        )
    return answer_texts(processor, out.sequences, inputs), out.logits[0]


def answer_requests(
    model,
    processor,
    items: Sequence[Item],
    settings: Sequence[Setting],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[RequestRecord]:
    """Answer ``items`` with the full model and every setting, batch by batch (greedy, fixed order).

    ``progress`` is called with the number of (request, setting) answers finished, the full model
    counting as one setting.
    """
    records: list[RequestRecord] = []
    for batch in batches(items, batch_size):
        inputs = encode(processor, batch, model.device)
        full_texts, full_logits = _answer(model, processor, inputs, max_new_tokens)
        rows = [RequestRecord(item.id, text) for item, text in zip(batch, full_texts)]
        if progress is not None:
            progress(len(batch))
        for setting in settings:
            with crosstrim.trimmed(model, setting.config) as handle:
                texts, logits = _answer(model, processor, inputs, max_new_tokens)
                stats = handle.stats
            tv, kl = first_token_divergence(full_logits, logits.to(full_logits.device))
            for b, (row, text) in enumerate(zip(rows, texts)):
                kv_full, kv_kept = stats.sample_kv_bytes(b)
                row.answers[setting.label] = Answer(
                    text, stats.kept_counts[b], stats.valid_counts[b], kv_full, kv_kept, float(tv[b]), float(kl[b])
                )
            if progress is not None:
                progress(len(batch))
        records.extend(rows)
    return records


def summarise(records: Sequence[RequestRecord], settings: Sequence[Setting], target: float) -> list[SettingResult]:
    """Agreement with its Wilson interval, mean divergences, kept share and KV bytes per setting."""
    if not records:
        raise ValueError("no requests to summarise")
    results = []
    for setting in settings:
        answers = [r.answers[setting.label] for r in records]
        agree = sum(a.text == r.full for a, r in zip(answers, records))
        low, high = wilson_interval(agree, len(records))
        fractions = [a.kept / a.valid if a.valid else 1.0 for a in answers]
        results.append(
            SettingResult(
                label=setting.label,
                family=str(setting.family),
                config=asdict(setting.config),
                items=len(records),
                agree=agree,
                agreement=agree / len(records),
                agreement_low=low,
                agreement_high=high,
                total_variation=statistics.fmean(a.total_variation for a in answers),
                kl=statistics.fmean(a.kl for a in answers),
                kept_fraction=statistics.fmean(fractions),
                kept_fraction_std=statistics.pstdev(fractions),
                kv_bytes_full=statistics.fmean(a.kv_bytes_full for a in answers),
                kv_bytes_kept=statistics.fmean(a.kv_bytes_kept for a in answers),
                meets_target=low >= target,
            )
        )
    return results


def recommend(results: Sequence[SettingResult]) -> SettingResult | None:
    """The setting that keeps the least among those that meet the target (``meets_target``: the Wilson
    lower bound of agreement reaches it); ties go to the smaller KV cache, then the higher agreement.
    ``None`` when no setting meets it."""
    passing = [r for r in results if r.meets_target]
    return min(passing, key=lambda r: (r.kept_fraction, r.kv_bytes_kept, -r.agreement), default=None)


@dataclass(frozen=True)
class Calibration:
    """The outcome: every setting's summary, the recommendation (``None`` if none meets the target)
    and every request's answers."""

    target: float
    results: list[SettingResult]
    recommended: SettingResult | None
    records: list[RequestRecord]

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "criterion": "wilson_lower_95",
            "divergence": "first answer token: mean total variation distance and mean KL(full || setting), nats",
            "recommended": self.recommended.label if self.recommended else None,
            "settings": [asdict(r) for r in self.results],
            "requests": [asdict(r) for r in self.records],
        }


def calibrate(
    model,
    processor,
    items: Sequence[Item],
    settings: Sequence[Setting],
    *,
    target: float = 0.95,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Calibration | None:
    """Answer ``items`` with the full model and every setting and recommend one for ``target`` agreement.

    Under ``torch.distributed`` every process passes the same items and settings and answers its
    shard (an even, contiguous run of items, as :func:`crosstrim.evaluation.distributed.shard` cuts it);
    rank 0 gets the result, the others ``None``.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target agreement must be in (0, 1]; got {target}")
    if not settings:
        raise ValueError("give at least one setting to calibrate")
    mine = distributed.shard(items, rank, world_size)
    rounds = len(settings) + 1  # the full model, then every setting, over each batch
    with distributed.job_progress(progress, len(items), world_size, batch_size, model.device, rounds) as report:
        records = answer_requests(
            model, processor, mine, settings, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=report
        )
    parts = distributed.gather(records, rank, world_size)
    if parts is None:
        return None
    merged = distributed.merge(items, parts)
    results = summarise(merged, settings, target)
    return Calibration(target, results, recommend(results), merged)


# -- requests ---------------------------------------------------------------------------------------


def _jsonl_requests(path: Path) -> list[Item]:
    items = []
    for number, where, record in sources.json_lines(path):
        try:
            if isinstance(record, sources.BadLine):
                raise record
            if not isinstance(record, dict) or not all(k in record for k in ("images", "prompt")):
                raise sources.BadLine("expected an object with 'images' (a list of paths) and 'prompt'")
            pictures = sources.line_images(path, record)
        except sources.BadLine as bad:
            raise UserError(f"{where}: {bad}") from bad
        item_id = str(record.get("id", number))
        items.append(Item(item_id, pictures, str(record["prompt"]), "", str(record.get("category", "all"))))
    return items


def load_requests(path: str | Path, prompt: str | None = None, *, skip_bad: bool = False) -> list[Item]:
    """Unlabelled requests: a ``.jsonl`` file (``images`` and ``prompt`` per line; ``id``, ``answer`` and
    ``category`` optional and answers unused), a VLMEvalKit ``.tsv`` (answers unused), or a folder of
    images asked ``prompt`` each (sorted by file name)."""
    source = Path(path)
    if source.is_dir():
        if not prompt:
            raise UserError(f"{str(source)!r} is a folder: give the question to ask of its images with --prompt")
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"folder {str(source)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [Item(p.name, (checkpoint.load_image(p),), prompt, "", "all") for p in files]
    if prompt:
        raise UserError("--prompt asks one question of a folder of images; a --data file carries its own prompts")
    if source.suffix.lower() == ".jsonl":
        if not source.is_file():
            raise UserError(f"request file {str(source)!r} does not exist")
        items = _jsonl_requests(source)
        if not items:
            raise UserError(f"request file {str(source)!r} has no requests")
        ids = [i.id for i in items]
        if len(set(ids)) != len(ids):
            raise UserError(f"request ids in {str(source)!r} must be unique (omit 'id' to number lines)")
        return items
    return sources.load(source, skip_bad=skip_bad).items


__all__ = [
    "Answer",
    "Calibration",
    "RequestRecord",
    "SettingResult",
    "answer_requests",
    "calibrate",
    "first_token_divergence",
    "load_requests",
    "recommend",
    "summarise",
]
