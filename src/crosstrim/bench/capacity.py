"""Capacity in a fixed memory budget: the largest batch each variant fits, predicted and measured, and the
decode throughput a user gets at it.

Every probe is what a user runs: ``crosstrim.generate(model, prefill_batch_size=N, **inputs)`` on a batch of
pixel inputs (vision encoder, projector and decoder prefilled N samples at a time, the micro-batch caches
merged, then transformers' greedy loop on the whole batch), full and trimmed alike. Its peak is the
process's: resident set on CPU (``VmHWM``), allocated bytes on GPU.

The prediction, :class:`Footprint`, in bytes::

    peak(B) = held + B * (kv + inputs) + max(transient, B * merge)

* ``held``: what the process holds before a run (weights, runtime), measured;
* ``kv``: one sample's KV cache after the last decode step (the memory model: self KV of prompt + steps,
  cross KV of the kept tokens);
* ``inputs``: one sample's inputs (pixel values in the model's dtype, ids, masks) where they are held on the
  measured device: on CPU all of them; on GPU none (they stay on the CPU, as a processor returns them, and
  each prefill slice moves over when it runs, so they count in the transient);
* ``transient``: the peak of one prefill micro-batch above its own KV and inputs (vision activations,
  projected features, the first cross layer's K/V expanded to every query head, scoring), measured by
  running a batch of N alone;
* ``merge``: the trimmed layers' micro-batch caches, whose widths differ, are joined layer by layer at the
  end, so one trimmed layer's keys (or values) of the whole batch exist twice for a moment; the layers
  every micro-batch shares are filled in place (the cache merger of :mod:`crosstrim.engine.generation`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch

import crosstrim
from crosstrim.adapters import adapter_for
from crosstrim.bench.measure import Clock, add_timers, peak, pixel_inputs, reset_peak
from crosstrim.core import TrimConfig
from crosstrim.engine import memory
from crosstrim.engine.cache import cache_argument

GB = 1e9


@dataclass(frozen=True)
class Footprint:
    """The memory model of one variant's run: ``peak(B) = held + B (kv + inputs) + max(transient, B merge)``."""

    held: int
    kv: int
    inputs: int
    transient: int
    merge: int

    def peak(self, batch: int) -> int:
        return self.held + batch * (self.kv + self.inputs) + max(self.transient, batch * self.merge)

    def largest_batch(self, budget: float) -> int:
        """Largest batch whose predicted peak fits ``budget`` bytes; 0 if none."""
        room = budget - self.held
        b = max(0, math.floor((room - self.transient) / (self.kv + self.inputs)))
        b = min(b, max(0, math.floor(room / (self.kv + self.inputs + self.merge))))
        return b if b > 0 and self.peak(b) <= budget else 0


def merge_bytes(mm: memory.MemoryModel, dtype, kept: int | None) -> int:
    """Per sample, what joining the micro-batch caches holds twice at once: one trimmed layer's keys at the
    kept width ``kept`` (``None``: nothing is trimmed, so nothing is joined). Layers every micro-batch shares
    (self-attention, untrimmed cross layers) are filled in place and cost nothing extra."""
    return 0 if kept is None else mm.kv_bytes_per_token(dtype) // 2 * kept


class StepClock:
    """A ``generate`` streamer that notes the time of every ``put``: the prompt, then each new token."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.marks = clock, []

    def put(self, value) -> None:
        self.marks.append(self.clock.now())

    def end(self) -> None:
        pass


def run_generate(model, config: TrimConfig | None, inputs: dict, steps: int, prefill_batch: int, clock: Clock):
    """One ``crosstrim.generate`` call, greedy, ``steps`` decode steps after the first token: its peak, time
    to first token, decode step times and per-layer decode times (median over steps), cache bytes, kept share."""
    handle, spans = crosstrim.trim(model, config) if config is not None else None, {}
    handles = add_timers(model, clock, spans) + ([handle] if handle is not None else [])
    streamer, new = StepClock(clock), steps + 1
    try:
        reset_peak(model.device)
        start = clock.now()
        with torch.inference_mode():
            out = crosstrim.generate(
                model,
                prefill_batch_size=prefill_batch,
                **inputs,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=model.config.text_config.pad_token_id,
                streamer=streamer,
                return_dict_in_generate=True,
            )
        top = peak(model.device)
    finally:
        for h in handles:
            h.remove()
    layers = adapter_for(model).decoder(model).layers
    kv = memory.held_kv_bytes(getattr(out, cache_argument(model)), model.config.text_config.cross_attention_layers)
    decode = [b - a for a, b in zip(streamer.marks[1:], streamer.marks[2:])]  # marks: prompt, token 1, 2, ...
    layer = [statistics.median(clock.seconds(a, b) for a, b in spans[i][-steps:]) for i in range(len(layers))]
    stats = handle.stats if handle is not None else None
    return {
        "peak_bytes": top,
        "ttft_s": streamer.marks[1] - start,
        "decode_s": decode,
        "layer_decode_s": layer,
        "kv_bytes": kv.total,
        "kept_width": None if stats is None else max(stats.kept_counts),
        "kept_fraction": 1.0 if stats is None else stats.mean_kept_fraction,
    }


def largest_fitting(fits, start: int, limit: int) -> int:
    """Largest ``b <= limit`` with ``fits(b)`` (monotone), walking one batch at a time from ``start``,
    so no probe overshoots the budget by more than one sample's memory."""
    b = max(1, min(start, limit))
    if fits(b):
        while b < limit and fits(b + 1):
            b += 1
        return b
    b -= 1
    while b > 0 and not fits(b):
        b -= 1
    return b


def search(model, mm: memory.MemoryModel, variants: list, args, clock: Clock) -> list[dict]:
    """For every variant: calibrate its footprint on one micro-batch, predict the largest batch within
    ``args.memory_budget`` GB, then find the measured one, probing from the prediction; decode throughput
    is read from the probe at the measured largest batch."""
    budget, text, steps, n = args.memory_budget * GB, max(args.text_values), args.decode_steps, args.prefill_batch
    first, dtype, results = args.trim_first_layer_cache, model.dtype, []
    held = reset_peak(model.device)
    print(
        f"\n--memory-budget {args.memory_budget:g} GB: crosstrim.generate(prefill_batch_size={n}), pixel inputs, "
        f"{text} text tokens + {steps + 1} new; held before a run {held / GB:.2f} GB"
    )
    for name, config in variants:
        runs: dict[int, dict] = {}

        def probe(batch: int, name=name, config=config, runs=runs) -> dict:
            inputs = pixel_inputs(model, mm, batch, text, args.seed)
            try:
                runs[batch] = run_generate(model, config, inputs, steps, n, clock)
            except torch.OutOfMemoryError:  # GPU: does not fit
                runs[batch] = {"peak_bytes": -1}
                torch.cuda.empty_cache()
            held_here = [t for t in inputs.values() if t.device == model.device]  # GPU: inputs stay on the CPU
            runs[batch]["input_bytes"] = sum(t.nbytes for t in held_here)
            return runs[batch]

        calibration = probe(n)
        if calibration["peak_bytes"] < 0:
            raise torch.OutOfMemoryError(f"{name}: one prefill micro-batch of {n} does not fit on this device")
        kept = calibration["kept_width"]
        r = 1.0 if config is None else config.keep_ratio or calibration["kept_fraction"]
        kv_model = mm.kv_bytes(dtype, text_tokens=text + steps, r=r, trim_first_layer_cache=first).total
        exact = config is None or config.keep_ratio is not None  # adaptive (k_ratio) keeps what the scores say
        kv = kv_model if exact else calibration["kv_bytes"] // n  # adaptive: as its calibration run held
        per_input = calibration["input_bytes"] // n
        transient = calibration["peak_bytes"] - held - n * (kv + per_input)
        fp = Footprint(held, kv, per_input, max(0, transient), merge_bytes(mm, dtype, kept))
        predicted = fp.largest_batch(budget)
        measured = largest_fitting(lambda b: 0 <= probe(b)["peak_bytes"] <= budget, max(predicted, 1), args.max_batch)
        at = runs.get(measured, {})
        result = {
            "variant": name,
            "kept_fraction": calibration["kept_fraction"],
            "footprint": asdict(fp),
            "kv_matches_model": calibration["kv_bytes"] == n * kv_model if exact else None,
            "predicted": predicted,
            "measured": measured,
            "capped": measured == args.max_batch,  # the search stopped at --max-batch, not at the budget
            "probes": {b: v["peak_bytes"] for b, v in sorted(runs.items())},
            "calibration": calibration,
            "at_largest": at,
        }
        if at:
            result["decode_s"] = statistics.median(at["decode_s"])
            result["tok_s"] = measured / result["decode_s"]
            result["decode_bytes"] = mm.decode_bytes(
                dtype, batch=measured, text_tokens=text + (steps + 1) // 2, r=r, trim_first_layer_cache=first
            )
        results.append(result)
        probes = ", ".join(f"{b}: {p / GB:.2f} GB" for b, p in result["probes"].items())
        stop = " (--max-batch)" if result["capped"] else ""
        print(f"  {name:>13}: largest batch predicted {predicted}, measured {measured}{stop} (peaks {probes})")
    full = results[0]
    for res in results[1:]:  # trimmed / full: batch, tokens/s, and tokens/s predicted by bytes moved
        res["batch_ratio"] = res["measured"] / full["measured"] if full["measured"] else None
        res["batch_ratio_predicted"] = res["predicted"] / full["predicted"] if full["predicted"] else None
        if "tok_s" in res and "tok_s" in full:
            res["tok_s_ratio"] = res["tok_s"] / full["tok_s"]
            res["tok_s_ratio_predicted"] = (res["measured"] / res["decode_bytes"]) / (
                full["measured"] / full["decode_bytes"]
            )
    return results


# -- full depth, composed from the measured parts -----------------------------------------------------------


def linear_fit(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """Least-squares coefficients of ``y = rows @ c``; None when the points do not determine them."""
    a, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    if torch.linalg.matrix_rank(a) < a.shape[1]:
        return None
    return torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()


def decode_time_model(results: list[dict], mm: memory.MemoryModel, first: bool):
    """A decode step's time at any batch and depth, from the per-layer decode times measured at each
    variant's largest batch: a self layer ``a + b B``; a cross layer ``a + b B + c B w`` with ``w`` the
    image tokens it reads (every cross layer, trimmed or not, is the same computation on ``w`` tokens);
    the rest (embedding, head, masks, sampling) ``a + b B``. Returns ``step(B, n_self, widths)`` or None
    when the measured batches cannot determine the fit (e.g. every variant at one batch)."""
    self_rows, self_y, cross_rows, cross_y, rest_rows, rest_y = [], [], [], [], [], []
    for res in results:
        at, b = res.get("at_largest") or {}, res["measured"]
        if "layer_decode_s" not in at:
            continue
        for i, t in enumerate(at["layer_decode_s"]):
            if i not in mm.cross_layers:
                self_rows.append([1, b]), self_y.append(t)
                continue
            trimmed = at["kept_width"] is not None and (first or i != mm.cross_layers[0])
            cross_rows.append([1, b, b * (at["kept_width"] if trimmed else mm.image_tokens)]), cross_y.append(t)
        rest_rows.append([1, b]), rest_y.append(statistics.median(at["decode_s"]) - sum(at["layer_decode_s"]))
    points = ((self_rows, self_y), (cross_rows, cross_y), (rest_rows, rest_y))
    fits = [linear_fit(rows, ys) if rows else None for rows, ys in points]
    if any(f is None for f in fits):
        return None
    (sa, sb), (ca, cb, cc), (ra, rb) = fits

    def step(batch: int, n_self: int, widths: list[int]) -> float:
        cross = sum(ca + cb * batch + cc * batch * w for w in widths)
        return ra + rb * batch + n_self * (sa + sb * batch) + cross

    return step


def full_weights_bytes(dims: str, dtype: torch.dtype) -> int:
    """Bytes of every parameter of the preset (text, vision encoder, projector), counted on the meta device."""
    from transformers import MllamaForConditionalGeneration

    with torch.device("meta"):
        model = MllamaForConditionalGeneration._from_config(memory.preset_config(dims))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def compose(results: list[dict], mm, ref, args, dtype: torch.dtype, weights: int, vision: dict | None) -> list[dict]:
    """Composed, not measured: each variant at the preset's full depth within ``args.full_depth_budget`` GB.

    Memory: :class:`Footprint` with the preset's weights (all of them, counted), the runtime measured here
    (held minus this model's weights), the preset's KV per sample (memory model), the same inputs, a
    transient of ``max(measured here, the composed real vision encoder's)``, and the preset's merge term.
    Decode: :func:`decode_time_model` at the preset's depth; beside it, tokens/s by bytes moved
    (``B / (W + B (S + C_r))``, what a memory-bound GPU would give). ``weights``: the measured model's bytes.
    """
    first, text, steps = args.trim_first_layer_cache, max(args.text_values), args.decode_steps
    budget = args.full_depth_budget * GB
    runtime = results[0]["footprint"]["held"] - weights
    weights = full_weights_bytes(args.dims, dtype)
    step = decode_time_model(results, mm, first)
    rows = []
    for res in results:
        r, fp = res["kept_fraction"], res["footprint"]
        kept = None if res["variant"] == "full" else memory.kept_tokens(ref.image_tokens, r)
        transient = max(fp["transient"], vision["transient_bytes"] if vision else 0)
        full = Footprint(
            held=weights + runtime,
            kv=ref.kv_bytes(dtype, text_tokens=text + steps, r=r if kept else 1.0, trim_first_layer_cache=first).total,
            inputs=fp["inputs"],
            transient=transient,
            merge=merge_bytes(ref, dtype, kept),
        )
        batch = full.largest_batch(budget)
        row = {"variant": res["variant"], "kept_fraction": r, "footprint": asdict(full), "batch": batch}
        at = text + (steps + 1) // 2
        moved = ref.decode_bytes(dtype, batch=batch, text_tokens=at, r=r if kept else 1.0, trim_first_layer_cache=first)
        row["tok_s_bytes_moved"] = batch / moved if batch else 0.0  # tokens per byte moved: only ratios matter
        if step is not None and batch:
            trimmed = ref.trimmed_layers(first) if kept else 0
            widths = [ref.image_tokens] * (ref.n_cross - trimmed) + [kept] * trimmed
            row["decode_s"] = step(batch, ref.n_self, widths)
            row["tok_s"] = batch / row["decode_s"]
        rows.append(row)
    for row in rows[1:]:
        base = rows[0]
        row["batch_ratio"] = row["batch"] / base["batch"] if base["batch"] else None
        row["tok_s_ratio_bytes_moved"] = row["tok_s_bytes_moved"] / base["tok_s_bytes_moved"] if base["batch"] else None
        if "tok_s" in row and "tok_s" in base:
            row["tok_s_ratio"] = row["tok_s"] / base["tok_s"]
    return rows
