"""Answer a dataset with several processes (torch.distributed): shard items, gather predictions, merge.

Launch one process per device with ``torchrun --nproc_per_node N`` (it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`process_group` joins the
group (``nccl`` when the process has a GPU, ``gloo`` on CPU) and picks ``cuda:LOCAL_RANK``;
:func:`predict_sharded` answers this process's shard and returns every prediction, in item order,
on rank 0 (``None`` elsewhere).

Shards are contiguous runs of items whose sizes differ by at most one, so no process idles while
another works (30 items in batches of 32 on 2 processes: 15 each, not 30 and 0). Each process forms
its own batches, so a sample may be padded differently than in a single process; selection and
decoding ignore padding (left padding is masked, and the random baseline seeds every sample from
its own tokens), so the answers are a single process's up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from crosstrim.core import TrimConfig
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import Prediction, predict

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """This process's place in the group and the device it should use."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun/accelerate set them; ``(0, 1, 0)`` when unset."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


@contextlib.contextmanager
def process_group(device: str = "auto", backend: str | None = None) -> Iterator[Rank]:
    """Join the process group torchrun describes (a no-op for one process) and leave it on exit.

    ``device="auto"`` takes ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; the backend
    follows the device (``nccl`` for CUDA, ``gloo`` for CPU) unless ``backend`` is given.
    """
    rank, world, local = from_environment()
    if device == "auto":
        chosen = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device(f"cuda:{local}")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    joined = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if chosen.type == "cuda" else "gloo"))
        joined = True
    try:
        yield Rank(rank, world, chosen)
    finally:
        if joined:
            dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process ``rank``'s items: a contiguous run, shard sizes differing by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(items[rank * len(items) // world_size : (rank + 1) * len(items) // world_size])


def merge(items: Sequence[Item], parts: Sequence[Sequence[Prediction]]) -> list[Prediction]:
    """Predictions of all shards, in item order; a missing, unknown or repeated item id is an error."""
    by_id: dict[str, Prediction] = {}
    for part in parts:
        for prediction in part:
            if prediction.id in by_id:
                raise ValueError(f"item {prediction.id!r} was answered twice; item ids must be unique")
            by_id[prediction.id] = prediction
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique to merge shards")
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} item(s) were not answered, e.g. {missing[0]!r}")
    extra = set(by_id) - set(ids)
    if extra:
        raise ValueError(f"predictions for unknown item(s), e.g. {sorted(extra)[0]!r}")
    return [by_id[i] for i in ids]


def gather(predictions: list[Prediction], rank: int, world_size: int) -> list[list[Prediction]] | None:
    """Every process's predictions on rank 0 (``None`` on the others); a list of one without a group."""
    if world_size == 1 or not dist.is_initialized():
        return [predictions]
    parts: list[list[Prediction]] | None = [[] for _ in range(world_size)] if rank == 0 else None
    dist.gather_object(predictions, parts, dst=0)
    return parts


def predict_sharded(
    model,
    processor,
    items: Sequence[Item],
    config: TrimConfig | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress=None,
) -> list[Prediction] | None:
    """:func:`~crosstrim.evaluation.inference.predict` over this process's shard; all predictions on rank 0.

    Every process must call it with the same items (in the same order) and settings. Rank 0 gets
    the merged predictions in item order, the others ``None``. ``progress`` is called after every batch
    with the number of items *all* processes finished in it, so a bar shows the whole job; in a group
    that is a collective (every process answers the same number of batch steps, a short shard
    reporting 0 for its missing last one), so pass it on every process or on none.
    """
    mine = shard(items, rank, world_size)
    with job_progress(progress, len(items), world_size, batch_size, model.device) as report:
        answered = predict(
            model, processor, mine, config, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=report
        )
    parts = gather(answered, rank, world_size)
    return None if parts is None else merge(items, parts)


@contextlib.contextmanager
def job_progress(
    progress, items: int, world_size: int, batch_size: int, device: torch.device, rounds: int = 1
) -> Iterator:
    """A per-batch ``progress`` callback that reports the items *all* processes finished, so one bar shows
    the whole job.

    Each call is a collective: every process must make the same number of calls, so a process whose
    shard has fewer batches reports 0 for its missing ones on leaving the block. ``rounds`` is how often
    each process goes over its shard (e.g. once per setting). Without a process group, or without
    ``progress``, ``progress`` is passed through.
    """
    if progress is None or world_size == 1 or not dist.is_initialized():
        yield progress
        return
    largest = -(-items // world_size)
    calls_left = rounds * -(-largest // batch_size)  # the batches of the largest shard, every round

    def report(count: int) -> None:
        nonlocal calls_left
        calls_left -= 1
        progress(_summed(count, device))

    yield report
    for _ in range(calls_left):
        progress(_summed(0, device))


def _summed(count: int, device: torch.device) -> int:
    """``count`` summed over the processes of the group (each must call it)."""
    total = torch.tensor([count], device=device)
    dist.all_reduce(total)
    return int(total.item())


__all__ = ["Rank", "from_environment", "gather", "job_progress", "merge", "predict_sharded", "process_group", "shard"]
