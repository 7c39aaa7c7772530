"""One capacity probe in a fresh process, as a user's process runs it: default allocator, nothing tuned.

A process's resident memory remembers what it ran before (glibc keeps freed small blocks in its heap, a
caching GPU allocator keeps its reserve), so a probe that shares a process with the latency grid or with
other probes measures that history, and a process that tunes its allocator measures a process no user runs.
:func:`run` starts ``python -m crosstrim.bench.probe`` for each probe; it builds the model the same way
(:class:`ModelSpec`, same seed, same weights), runs one ``crosstrim.generate`` and reports its peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from crosstrim.core import TrimConfig


@dataclass(frozen=True)
class ModelSpec:
    """How a fresh process builds the bench's model: a checkpoint, or the random model of ``dims`` (same seed,
    so every probe holds the same weights)."""

    device: str
    dtype: str  # a name in crosstrim.engine.memory.DTYPES
    seed: int
    threads: int | None = None
    checkpoint: str | None = None
    dims: str | None = None
    layers: int | None = None
    cross: tuple[int, ...] = ()
    vocab: int | None = None
    real_vision: bool = False

    def build(self):
        from crosstrim.bench.measure import random_model
        from crosstrim.engine.memory import DTYPES

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        dtype, device = DTYPES[self.dtype], torch.device(self.device)
        if self.checkpoint is not None:  # checked by the bench command before any probe runs
            from transformers import MllamaForConditionalGeneration

            return MllamaForConditionalGeneration.from_pretrained(self.checkpoint, dtype=dtype).to(device).eval()
        model = random_model(
            self.dims, self.layers, list(self.cross), self.vocab, device, dtype, self.seed, self.real_vision
        )
        return model


@dataclass(frozen=True)
class Probe:
    """One run: ``batch`` prompts of ``text`` tokens with pixel inputs, ``steps`` timed decode steps, the prefill
    ``prefill_batch`` samples at a time; ``config`` ``None`` for the full model."""

    model: ModelSpec
    config: TrimConfig | None
    batch: int
    text: int
    steps: int
    prefill_batch: int
    seed: int


def run(probe: Probe) -> dict:
    """The probe's measurement from a fresh process (see :func:`main`); ``peak_bytes`` -1 when it did not fit
    (GPU out of memory, or the process was killed)."""
    payload = dataclasses.asdict(probe)
    # The default allocator: no glibc tuning inherited (MALLOC_MMAP_THRESHOLD_ and the like, GLIBC_TUNABLES).
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
    done = subprocess.run(
        [sys.executable, "-m", "crosstrim.bench.probe"],
        input=json.dumps(payload),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        if "OutOfMemoryError" in done.stderr or done.returncode < 0:
            return {"peak_bytes": -1, "held_bytes": -1, "input_bytes": 0}
        raise RuntimeError(f"capacity probe failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    """Read a :class:`Probe` as JSON on stdin, run it, print the measurement as one JSON line."""
    from crosstrim.bench.capacity import run_generate
    from crosstrim.bench.measure import Clock, pixel_inputs, reset_peak
    from crosstrim.engine import memory

    payload = json.loads(sys.stdin.read())
    spec = payload.pop("model")
    spec = ModelSpec(**(spec | {"cross": tuple(spec["cross"])}))
    config = payload.pop("config")
    probe = Probe(model=spec, config=None if config is None else TrimConfig(**config), **payload)
    model = spec.build()
    mm = memory.MemoryModel.from_config(model.config)
    held = reset_peak(model.device)
    inputs = pixel_inputs(model, mm, probe.batch, probe.text, probe.seed)
    kept_on_device = [t for t in inputs.values() if t.device == model.device]  # GPU: inputs stay on the CPU
    try:
        result = run_generate(model, probe.config, inputs, probe.steps, probe.prefill_batch, Clock(model.device))
    except torch.OutOfMemoryError:
        result = {"peak_bytes": -1}
    result |= {"held_bytes": held, "input_bytes": sum(t.nbytes for t in kept_on_device), "pid": os.getpid()}
    result["call"] = [len(inputs["input_ids"]), probe.prefill_batch, "pixel_values" in inputs]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
