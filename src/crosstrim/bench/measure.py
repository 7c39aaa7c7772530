"""Clocks and one measurement: the model and its inputs, wall/CPU clocks, peak memory, per-layer timers,
and :func:`measure`, which prefills every variant and decodes them step by step, interleaved."""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import torch

import crosstrim
from crosstrim.adapters import adapter_for
from crosstrim.core import TrimConfig
from crosstrim.engine import memory
from crosstrim.engine.cache import cache_argument

# -- the model and its inputs ----------------------------------------------------------------------------


def random_model(dims: str, layers: int, cross: list[int], vocab: int, device, dtype, seed: int, real_vision=False):
    """Random weights: the text layers of a preset (or tiny), gates open, and a tiny vision encoder with the
    preset's tile geometry (``real_vision``: the preset's own encoder). The latency grid feeds projected
    features (the encoder does not run); the capacity search feeds pixels, so its prefill runs the encoder
    and the projector as a user's does."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from crosstrim import tiny

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = tiny.tiny_config(vocab, text_layers=layers, cross_attention_layers=cross, **ids)
    if dims != "tiny":
        real = memory.preset_config(dims)
        tiles = {k: getattr(real.vision_config, k) for k in ("image_size", "patch_size", "max_num_tiles")}
        text = real.text_config.to_dict() | {"num_hidden_layers": layers, "cross_attention_layers": cross}
        vision = real.vision_config if real_vision else tiny.tiny_config(vocab, vision_layers=1, **tiles).vision_config
        text |= {"vocab_size": vocab, **ids}
        config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=vocab)
    torch.manual_seed(seed)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype)
    tiny.set_gates(model, 1.0)  # zero-initialised gates would make the image path a no-op
    return model.eval()


def make_inputs(model, mm: memory.MemoryModel, batch: int, text: int, seed: int) -> dict:
    """Random prompt tokens that all attend one image of ``max_tiles`` tiles, given as random projected features."""
    gen, device = torch.Generator().manual_seed(seed + 1000 * batch + text), model.device
    feats = torch.randn(batch * mm.max_tiles, mm.tokens_per_tile, mm.hidden, generator=gen, dtype=model.dtype)
    return {
        "input_ids": torch.randint(3, mm.vocab, (batch, text), generator=gen).to(device),
        "attention_mask": torch.ones(batch, text, dtype=torch.long, device=device),
        "cross_attention_states": feats.to(device),
        "cross_attention_mask": torch.ones(batch, text, 1, mm.max_tiles, dtype=torch.long, device=device),
    }


def pixel_inputs(model, mm: memory.MemoryModel, batch: int, text: int, seed: int) -> dict:
    """What a processor gives ``generate`` for ``batch`` prompts of ``text`` tokens, each with one image of
    ``max_tiles`` tiles: random pixel values (in the model's dtype), aspect ratios, masks; on the CPU, as a
    processor returns them (``crosstrim.generate`` moves each prefill slice to the model's device)."""
    gen, device, tiles = torch.Generator().manual_seed(seed + 1000 * batch + text), "cpu", mm.max_tiles
    ratios = model.config.vision_config.supported_aspect_ratios
    ratio_id = 1 + next(i for i, (h, w) in enumerate(ratios) if h * w == tiles)  # ids count from 1
    size = (batch, 1, tiles, 3, mm.image_size, mm.image_size)
    return {
        "input_ids": torch.randint(3, mm.vocab, (batch, text), generator=gen).to(device),
        "attention_mask": torch.ones(batch, text, dtype=torch.long, device=device),
        "pixel_values": torch.randn(size, generator=gen, dtype=model.dtype).to(device),
        "aspect_ratio_ids": torch.full((batch, 1), ratio_id, dtype=torch.long, device=device),
        "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long, device=device),
        "cross_attention_mask": torch.ones(batch, text, 1, tiles, dtype=torch.long, device=device),
    }


# -- clocks, memory, hook timers --------------------------------------------------------------------------


class Clock:
    """Wall time for runs (GPU: synchronised); hook intervals as CUDA events so hooks never synchronise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, stop) -> float:
        return start.elapsed_time(stop) / 1e3 if self.cuda else stop - start


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak), in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    return status_bytes("VmRSS")


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")


def busy_seconds() -> float:
    """CPU seconds every process has spent on the cores this process may run on (Linux ``/proc/stat``)."""
    cores, ticks = {f"cpu{c}" for c in os.sched_getaffinity(0)}, 0
    for name, *values in (line.split() for line in Path("/proc/stat").read_text().splitlines()):
        if name in cores:  # user nice system idle iowait irq softirq steal ...: all but idle and iowait
            ticks += sum(int(v) for i, v in enumerate(values[:8]) if i not in (3, 4))
    return ticks / os.sysconf("SC_CLK_TCK")


def add_timers(model, clock: Clock, spans: dict) -> list:
    """Timers around crosstrim's hooks (``spans["hook"]``) and around each decoder layer (``spans[i]``).

    ``prepend=True`` starts run before crosstrim's hooks, appended stops after them. At the first cross
    layer the hook is scoring + selection (a forward hook); at later ones the gathers of features and mask
    (pre-hooks). Add after :func:`crosstrim.trim`; the layer timers come last, so their starts run first.
    """
    layers, opened = adapter_for(model).decoder(model).layers, {}
    cross = sorted(model.config.text_config.cross_attention_layers)

    def pair(register_start, register_stop, key) -> list:
        start = register_start(lambda *_: opened.__setitem__(key, clock.mark()), prepend=True)
        return [start, register_stop(lambda *_: spans.setdefault(key, []).append((opened.pop(key), clock.mark())))]

    handles = pair(layers[cross[0]].register_forward_hook, layers[cross[0]].register_forward_hook, "hook")
    for i in cross[1:]:
        handles += pair(layers[i].register_forward_pre_hook, layers[i].register_forward_pre_hook, "hook")
    for i, layer in enumerate(layers):
        handles += pair(layer.register_forward_pre_hook, layer.register_forward_hook, i)
    return handles


# -- one measurement: prefill, then decode steps on its cache --------------------------------------------


def timed_call(model, config: TrimConfig | None, clock: Clock, **inputs):
    """One forward pass, trimmed by ``config`` (hooks installed for this call only), and its greedy token:
    ``(cache, token, (wall, process CPU, other processes' CPU on our cores, crosstrim hooks) seconds,
    seconds per decoder layer, trim stats or None)``."""
    handle, spans = crosstrim.trim(model, config) if config is not None else None, {}
    handles = add_timers(model, clock, spans) + ([handle] if handle is not None else [])
    try:
        busy, cpu, wall = 0.0 if clock.cuda else busy_seconds(), time.process_time(), clock.now()
        with torch.inference_mode():
            result = model(**inputs, use_cache=True)
            token = result.logits[:, -1].argmax(-1, keepdim=True)
        wall, cpu = clock.now() - wall, time.process_time() - cpu
        other = 0.0 if clock.cuda else max(0.0, busy_seconds() - busy - cpu)  # contention on a shared machine
    finally:
        for h in handles:
            h.remove()
    t = {key: sum(clock.seconds(a, b) for a, b in v) for key, v in spans.items()}
    layers = [t[i] for i in range(len(adapter_for(model).decoder(model).layers))]
    stats = handle.stats if handle is not None else None
    cache = getattr(result, cache_argument(model))
    return cache, token, (wall, cpu, other, t.get("hook", 0.0)), layers, stats


KEYS = ("{}_s", "{}_cpu_s", "{}_other_cpu_s", "hook_{}_s", "layer_{}_s")  # a sample's times, as timed_call's


def measure(model, variants: list, inputs: dict, steps: int, clock: Clock) -> dict[str, dict]:
    """Prefill every variant (in the given order), then decode ``steps`` greedy steps, interleaving the
    variants step by step on their own caches, so slow drifts hit full and trimmed alike.

    Decode steps of a trimmed variant read the selection its prefill stored on its cache. Peak memory
    is per prefill, on top of what was held before the shape's first prefill (the other variants'
    caches held meanwhile do not count).
    """
    state, out, fixed = {}, {}, reset_peak(model.device)
    for name, config in variants:
        base = reset_peak(model.device)
        cache, token, times, layers, stats = timed_call(model, config, clock, **inputs, logits_to_keep=1)
        kv = memory.held_kv_bytes(cache, model.config.text_config.cross_attention_layers)
        out[name] = {
            "peak_bytes": fixed + peak(model.device) - base,
            "kv_self_bytes": kv.self_attn,
            "kv_cross_bytes": kv.cross_attn,
            **{key.format("prefill"): t for key, t in zip(KEYS, (*times, layers))},
            **{key.format("decode"): [] for key in KEYS},
        }
        if stats is not None:
            out[name].update(kept=list(stats.kept_counts), valid=list(stats.valid_counts))
        state[name] = (cache, token, inputs["attention_mask"])
    for _ in range(steps):
        for name, config in variants:
            cache, token, mask = state[name]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = {"attention_mask": mask, "cross_attention_mask": inputs["cross_attention_mask"][:, -1:]}
            step |= {"input_ids": token, cache_argument(model): cache}
            _, token, times, layers, _ = timed_call(model, config, clock, **step)
            state[name] = (cache, token, mask)
            for key, t in zip(KEYS, (*times, layers)):
                out[name][key.format("decode")].append(t)
    for sample in out.values():  # per layer, the median over steps
        sample["layer_decode_s"] = [statistics.median(t) for t in zip(*sample["layer_decode_s"])]
    return out
