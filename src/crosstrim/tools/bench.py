"""``crosstrim bench``: time to first token, decode time per token, throughput and peak memory, full vs
trimmed, in one run. One file, read top to bottom (gpt-fast style); method and results: docs/benchmarks.md.

Without ``--model`` the model has the real layer dimensions of Llama-3.2-11B-Vision (``--dims 90b``: 90B)
with random weights at reduced depth (``--layers``), and it is fed precomputed image features of real size
(4 tiles x 1601 tokens), so no time goes to the vision encoder. Trimmed variants use an exact kept fraction
(``TrimConfig(keep_ratio=r)``) so every run keeps the same number of tokens; the paper's adaptive rule
(``--k-ratio``) is reported separately with the fraction it keeps on this model's features.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import inspect
import itertools
import json
import os
import platform
import re
import statistics
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import crosstrim
from crosstrim import memory
from crosstrim.config import TrimConfig
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.tools.kv import fractions, ints, table

GB, MB = 1e9, 1e6


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency and memory, full vs trimmed, in one run")
    p.add_argument("--model", metavar="DIR", help="local checkpoint; without it: random weights, real layer dims")
    p.add_argument("--dims", help="layer dims of the random model: 11b (default), 90b, tiny (tests)")
    p.add_argument("--layers", type=int, help="text layers of the random model (default 4), cross at 3,8,.. or 1,3,..")
    p.add_argument("--vocab", type=int, help="vocabulary of the random model (default 16384)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on GPU)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    p.add_argument("--batch", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    p.add_argument("--text", default="32,256", help="text tokens of the prompt (default 32,256)")
    p.add_argument("--keep", default="0.5,0.25,0.1", help="exact kept fractions r of the trimmed variants")
    p.add_argument("--k-ratio", default="0.25", help="paper rule: report the fraction it keeps (default 0.25)")
    p.add_argument("--trim-first-layer-cache", action="store_true", help="trimmed variants also shrink layer 1")
    p.add_argument("--decode-steps", type=int, default=6, help="timed decode steps per run (default 6)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every variant per shape (default 3)")
    p.add_argument("--warmup", type=int, help="untimed runs per shape (default 1 on GPU, 0 on CPU)")
    p.add_argument("--memory-budget", type=float, metavar="GB", help="find the largest batch that fits (GB)")
    p.add_argument("--max-batch", type=int, default=256, help="upper limit of the --memory-budget search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", metavar="DIR", help="JSON + PNG folder")
    p.add_argument("--tag", help="file name stem (default: from dims or checkpoint, and device)")
    p.set_defaults(run=run)


# -- the model and its inputs ----------------------------------------------------------------------------


def random_model(dims: str, layers: int, cross: list[int], vocab: int, device, dtype, seed: int):
    """Random weights: the text layers of a preset (or tiny), a tiny vision encoder with the preset's tile
    geometry (never run: features are fed directly), gates open."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from crosstrim import tiny

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = tiny.tiny_config(vocab, text_layers=layers, cross_attention_layers=cross, **ids)
    if dims != "tiny":
        real = memory.preset_config(dims)
        tiles = {k: getattr(real.vision_config, k) for k in ("image_size", "patch_size", "max_num_tiles")}
        text = real.text_config.to_dict() | {"num_hidden_layers": layers, "cross_attention_layers": cross}
        vision = tiny.tiny_config(vocab, vision_layers=1, **tiles).vision_config
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


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    return _status("VmRSS")


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")


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
    layers, opened = model.model.language_model.layers, {}
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
    layers = [t[i] for i in range(len(model.model.language_model.layers))]
    stats = handle.stats if handle is not None else None
    cache = getattr(result, cache_argument())
    return cache, token, (wall, cpu, other, t.get("hook", 0.0)), layers, stats


@functools.cache
def cache_argument() -> str:
    """transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``
    (the old name warns until it goes in 5.40); older releases know only the old name."""
    from transformers import MllamaForConditionalGeneration

    return (
        "cache"
        if "cache" in inspect.signature(MllamaForConditionalGeneration.forward).parameters
        else "past_key_values"
    )


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
            step |= {"input_ids": token, cache_argument(): cache}
            _, token, times, layers, _ = timed_call(model, config, clock, **step)
            state[name] = (cache, token, mask)
            for key, t in zip(KEYS, (*times, layers)):
                out[name][key.format("decode")].append(t)
    for sample in out.values():  # per layer, the median over steps
        sample["layer_decode_s"] = [statistics.median(t) for t in zip(*sample["layer_decode_s"])]
    return out


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


# -- summary ----------------------------------------------------------------------------------------------


def spread(values: list[float]) -> float:
    """(max - min) / median, as a fraction."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def at_depth(layer_s: list[float], total: float, mm: memory.MemoryModel, ref: memory.MemoryModel) -> float:
    """``total`` with the bench's decoder layers swapped for ``ref``'s full depth, from measured layer times:
    every self layer costs the median bench self layer, the first cross layer what it cost here, every
    later cross layer the median later cross layer. Embedding, head and mask preparation stay as measured."""
    cross = mm.cross_layers
    self_s = [t for i, t in enumerate(layer_s) if i not in cross]
    self_t = statistics.median(self_s) if self_s else 0.0
    later = statistics.median(layer_s[i] for i in cross[1:])
    return total - sum(layer_s) + ref.n_self * self_t + layer_s[cross[0]] + (ref.n_cross - 1) * later


def summarise(samples: list[dict], mm: memory.MemoryModel, ref: memory.MemoryModel | None, args) -> list[dict]:
    """One row per (text, batch, variant): medians, spreads and, for trimmed variants, ratios to full."""
    med, rows, dtype, first = statistics.median, [], args.kv_dtype, args.trim_first_layer_cache
    for text, batch in itertools.product(args.text_values, args.batch_values):
        for name, config in args.variants:
            runs = [s for s in samples if (s["text"], s["batch"], s["variant"]) == (text, batch, name)]

            def every(key: str, runs=runs) -> list:  # a value per run, or every decode step of every run
                return [v for s in runs for v in (s[key] if isinstance(s[key], list) else [s[key]])]

            row = {"text": text, "batch": batch, "variant": name, "runs": len(runs)}
            for key in ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s", "peak_bytes"):
                row[key] = med(every(key))
            row.update(prefill_spread=spread(every("prefill_s")), decode_spread=spread(every("decode_s")))
            row["decode_tok_s"] = batch / row["decode_s"]
            other = sum(every("prefill_other_cpu_s") + every("decode_other_cpu_s"))
            row["other_cpu_share"] = other / sum(every("prefill_s") + every("decode_s"))  # per second we ran
            row.update(kv_self_bytes=runs[0]["kv_self_bytes"], kv_cross_bytes=runs[0]["kv_cross_bytes"])
            shape = dict(batch=batch, r=1.0 if config is None else config.keep_ratio, trim_first_layer_cache=first)
            kv = mm.kv_bytes(dtype, text_tokens=text, **shape)
            row["kv_matches_model"] = all(memory.KVBytes(s["kv_self_bytes"], s["kv_cross_bytes"]) == kv for s in runs)
            if ref is not None:
                row["prefill_full_depth_s"] = med(at_depth(s["layer_prefill_s"], s["prefill_s"], mm, ref) for s in runs)
                row["decode_full_depth_s"] = med(
                    at_depth(s["layer_decode_s"], med(s["decode_s"]), mm, ref) for s in runs
                )
            rows.append(row)
            if config is None:
                full, row["kept_fraction"] = row, 1.0
                continue
            at = text + (args.decode_steps + 1) // 2  # mean decode position
            row["kept_fraction"] = statistics.mean(k / v for k, v in zip(runs[0]["kept"], runs[0]["valid"]))
            for key in ("prefill", "decode", "decode_cpu"):
                row[f"{key}_ratio"] = row[f"{key}_s"] / full[f"{key}_s"]
            row["decode_ratio_predicted"] = mm.decode_ratio(dtype, text_tokens=at, **shape)
            row.update(hook_prefill_s=med(every("hook_prefill_s")), hook_decode_s=med(every("hook_decode_s")))
            row["scoring_share"] = row["hook_prefill_s"] / row["prefill_s"]
            if ref is not None:
                for key in ("prefill", "decode"):
                    row[f"{key}_ratio_full_depth"] = row[f"{key}_full_depth_s"] / full[f"{key}_full_depth_s"]
                row["scoring_share_full_depth"] = row["hook_prefill_s"] / row["prefill_full_depth_s"]
                row["decode_ratio_predicted_full_depth"] = ref.decode_ratio(dtype, text_tokens=at, **shape)
    return rows


# Printed tables, "header=format" per column; a cell whose key its row lacks (the full rows' ratios) is blank.
COLUMNS = (
    "text={text}|batch={batch}|variant={variant}|kept={kept_fraction:.1%}|prefill s={prefill_s:.3f}"
    "|±={prefill_spread:.0%}|ratio={prefill_ratio:.3f}|decode ms={decode_ms:.1f}|±={decode_spread:.0%}"
    "|ratio={decode_ratio:.3f}|predicted={decode_ratio_predicted:.3f}|cpu-time ratio={decode_cpu_ratio:.3f}"
    "|tok/s={decode_tok_s:.1f}|peak GB={peak_gb:.2f}|KV GB={kv_gb:.3f}|scoring={scoring_share:.2%}"
)
FULL_DEPTH = (
    "text={text}|batch={batch}|variant={variant}|prefill ratio={prefill_ratio_full_depth:.3f}"
    "|scoring share={scoring_share_full_depth:.2%}|decode ratio={decode_ratio_full_depth:.3f}"
    "|predicted={decode_ratio_predicted_full_depth:.3f}"
)


def render(rows: list[dict], columns: str) -> str:
    def cell(r: dict, fmt: str) -> str:
        kv = r["kv_self_bytes"] + r["kv_cross_bytes"]
        r = r | {"decode_ms": r["decode_s"] * 1e3, "peak_gb": r["peak_bytes"] / GB, "kv_gb": kv / GB}  # printed units
        try:
            return fmt.format_map(r)
        except KeyError:
            return ""

    header, formats = zip(*(c.split("=", 1) for c in columns.split("|")))
    return table(list(header), [[cell(r, fmt) for fmt in formats] for r in rows])


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Prefill, decode step and decode ratio (measured o, predicted x) vs batch; one line style per text length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    for t, text in enumerate(sorted({r["text"] for r in rows})):
        for v, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            sel = [r for r in rows if r["text"] == text and r["variant"] == name]
            xs, style = [r["batch"] for r in sel], {"color": f"C{v}", "ls": ["-", "--", ":", "-."][t % 4]}
            axes[0].plot(xs, [r["prefill_s"] for r in sel], marker="o", label=f"{name}, {text} text tokens", **style)
            axes[1].plot(xs, [r["decode_s"] * 1e3 for r in sel], marker="o", **style)
            if "decode_ratio" in sel[0]:
                axes[2].plot(xs, [r["decode_ratio"] for r in sel], marker="o", **style)
                axes[2].plot(xs, [r["decode_ratio_predicted"] for r in sel], marker="x", alpha=0.4, **style)
    labels = ("prefill (time to first token), s", "decode, ms per step", "decode trimmed/full: o measured, x predicted")
    batches = sorted({r["batch"] for r in rows})
    for ax, label in zip(axes, labels):
        ax.set(xscale="log", xlabel="batch size", ylabel=label)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- the run ----------------------------------------------------------------------------------------------


def parse(args) -> tuple[torch.device, torch.dtype | None]:
    """Validate everything before loading anything (errors: one-line UserErrors); the device and the dtype."""
    args.batch_values, args.text_values = ints(args.batch, "--batch"), ints(args.text, "--text")
    args.keep_values = fractions(args.keep)
    args.k_values = fractions(args.k_ratio, "--k-ratio") if args.k_ratio else []
    for name, least in (("decode_steps", 1), ("repeats", 1), ("max_batch", 1), ("threads", 1), ("warmup", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise UserError("--memory-budget must be a positive number of GB")
    given = [n for n in ("dims", "layers", "vocab") if getattr(args, n) is not None]
    if args.model is not None and given:
        raise UserError(f"--{given[0]} shapes the random model; drop it with --model")
    if args.model is None:
        args.dims, args.layers = (args.dims or "11b").lower(), 4 if args.layers is None else args.layers
        args.vocab = args.vocab or (512 if args.dims == "tiny" else 16384)
        cross = list(range(3, args.layers, 5))  # the real layout: every fifth layer from 3
        args.cross_values = cross if len(cross) >= 2 else list(range(1, args.layers, 2))
        if args.dims not in (*memory.PRESETS, "tiny"):
            raise UserError(f"unknown --dims {args.dims!r}; choose 11b, 90b or tiny")
        if len(args.cross_values) < 2:
            raise UserError("the random model needs >= 2 cross-attention layers: --layers 4 (cross 1,3) or more")
        if args.vocab < 8:
            raise UserError("--vocab must be at least 8")
    configs = [TrimConfig(keep_ratio=r, trim_first_layer_cache=args.trim_first_layer_cache) for r in args.keep_values]
    args.variants = [("full", None)] + [(f"keep {c.keep_ratio:g}", c) for c in configs if c.keep_ratio < 1]
    if len(args.variants) < 2:
        raise UserError("--keep needs at least one fraction below 1 to compare against the full model")
    device = checkpoint.resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, **checkpoint.DTYPES}.get(args.dtype)
    if dtype is None:
        raise UserError(f"unknown dtype {args.dtype!r}; use one of auto, {', '.join(checkpoint.DTYPES)}")
    return device, dtype


def run(args: argparse.Namespace) -> int:
    device, dtype = parse(args)
    cpu, out = device.type == "cpu", Path(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if cpu:
        if not Path("/proc/self/clear_refs").exists():
            raise UserError("peak memory on CPU needs Linux /proc; run on Linux or use --device cuda")
        try:  # glibc returns freed blocks >= 1 MiB to the OS (M_MMAP_THRESHOLD), so the peak RSS is per run
            args.mallopt = ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1
        except OSError:
            args.mallopt = False
        free = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) * 1024
        if args.memory_budget and args.memory_budget * GB > _status("VmRSS") + free:
            raise UserError(f"--memory-budget {args.memory_budget:g} GB exceeds the {free / GB:.1f} GB available")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {str(out)!r}: {err}") from err
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    machine["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    machine["cpu"] = (re.findall(r"model name\s*:\s*(.*)", cpuinfo) or [platform.processor()])[0]
    machine["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    machine["torch_threads"], machine["loadavg_start"] = torch.get_num_threads(), os.getloadavg()

    if args.model is not None:
        model, source = checkpoint.load(args.model, str(device), args.dtype)[0], f"checkpoint {args.model}"
    else:
        print(f"building random {args.dims} model: {args.layers} layers, cross {args.cross_values} ...", flush=True)
        model = random_model(args.dims, args.layers, args.cross_values, args.vocab, device, dtype, args.seed)
        dims = "tiny test" if args.dims == "tiny" else f"real Llama-3.2-{args.dims.upper()}-Vision"
        depth = f"{args.layers} text layers with cross-attention at {args.cross_values}, vocabulary {args.vocab}"
        source = f"RANDOM WEIGHTS, {dims} layer dimensions, reduced depth: {depth}"
    mm, args.kv_dtype = memory.MemoryModel.from_config(model.config, name=args.tag or "bench"), model.dtype
    size = f"{mm.max_tiles} tiles x {mm.tokens_per_tile} tokens"
    source += (
        f"; fed random precomputed image features of the config's size ({size}) instead of running the vision encoder"
    )
    # Full-depth view: the measured layers composed to the preset's depth (random model only).
    ref = memory.preset(args.dims) if args.model is None and args.dims in memory.PRESETS else None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    threads = f"{torch.get_num_threads()} thread(s)" if cpu else "GPU, synchronised timings"
    print(f"model: {source}\ndevice: {device} ({threads}), dtype {model.dtype}, weights {weights / GB:.2f} GB")

    adaptive, small = {}, make_inputs(model, mm, args.batch_values[0], args.text_values[0], args.seed)
    for k in args.k_values:  # the paper's adaptive rule, for reference: the fraction it keeps on these features
        with crosstrim.trimmed(model, TrimConfig(k_ratio=k)) as handle, torch.inference_mode():
            model(**small, use_cache=True, logits_to_keep=1)
        adaptive[f"{k:g}"] = handle.stats.mean_kept_fraction
        print(f"trimmed k_ratio={k:g} (paper rule, adaptive) keeps {adaptive[f'{k:g}']:.1%} of image tokens here")
    warmup = args.warmup if args.warmup is not None else (0 if cpu else 1)
    print("warm-up: every variant once at the first shape" + (f", then {warmup} per shape" if warmup else ""))
    measure(model, args.variants, small, 1, clock := Clock(device))
    del small  # memory held here would count in every peak
    samples, started = [], time.perf_counter()
    for text, batch in itertools.product(args.text_values, args.batch_values):
        inputs = make_inputs(model, mm, batch, text, args.seed)
        for _ in range(warmup):
            measure(model, args.variants, inputs, 1, clock)
        for rep in range(args.repeats):  # variants alternate; the order flips every repeat
            order = args.variants if rep % 2 == 0 else args.variants[::-1]
            for name, sample in measure(model, order, inputs, args.decode_steps, clock).items():
                samples.append({"text": text, "batch": batch, "variant": name, "repeat": rep, **sample})
        del inputs
        print(f"  text {text:>4} batch {batch:>3} measured  [{time.perf_counter() - started:.0f} s]", flush=True)

    rows, w = summarise(samples, mm, ref, args), mm.decode_weight_bytes(model.dtype)
    print(f"\nMeasured on {source}; {device}, {threads}, {model.dtype}.")
    print(render(rows, COLUMNS if cpu else COLUMNS.replace("|cpu-time ratio={decode_cpu_ratio:.3f}", "")))
    print(
        f"prefill = time to first token, s; decode = ms per step, median of {args.repeats} runs x {args.decode_steps} "
        "steps; ± = (max-min)/median; ratio = trimmed/full; predicted = bytes-moved model (W + B(S + C_r)) / "
        "(W + B(S + C)); peak = held before the shape + this prefill's peak; scoring = hook time / prefill.\n"
        f"bytes-moved model: W = {w / GB:.2f} GB of weights read per step; per sample C = "
        f"{mm.cross_kv_bytes(model.dtype) / MB:.1f} MB cross KV, S = {mm.self_kv_bytes(1, model.dtype) / 1e3:.1f} kB "
        f"self KV per text token; first cross layer {'trimmed' if args.trim_first_layer_cache else 'kept full'}."
    )
    if ref is not None:
        print(
            f"\nEstimated at full {ref.name} depth ({ref.layers} layers, {ref.n_cross} cross): measured layer times "
            f"composed ({ref.n_self} x self layer, first cross layer, {ref.n_cross - 1} x later cross layer); "
            "predicted = bytes-moved model at full depth.\n"
            + render([r for r in rows if "decode_ratio" in r], FULL_DEPTH)
        )
    ok = all(r["kv_matches_model"] for r in rows)
    print(f"KV cache bytes after prefill == memory model (self and cross, every run): {'yes' if ok else 'NO'}")
    if cpu:
        shares = [r["other_cpu_share"] for r in rows]
        print(
            f"other processes on our core(s) while we ran: median {statistics.median(shares):.1%}, "
            f"worst shape {max(shares):.1%} of our wall time"
        )
    budget = memory_budget(model, mm, args, clock, samples) if args.memory_budget else None

    machine["loadavg_end"] = os.getloadavg()
    result = {
        "argv": sys.argv,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": source,
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "variants", "kv_dtype")},
        "dims": dataclasses.asdict(mm) | {"tokens_per_tile": mm.tokens_per_tile},
        "dtype": str(model.dtype),
        "weights_bytes": weights,
        "decode_weight_bytes": w,
        "versions": {m.__name__: m.__version__ for m in (crosstrim, torch, __import__("transformers"))},
        "machine": machine,
        "adaptive_kept_fraction": adaptive,
        "summary": rows,
        "memory_budget": budget,
        "samples": samples,
    }
    tag = args.tag or (Path(args.model).name if args.model else f"{args.dims}-L{args.layers}") + f"-{device.type}"
    (out / f"bench-{tag}.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / f"bench-{tag}.png", textwrap.fill(f"{source}; {device}, {threads}, {model.dtype}", 160))
    print(f"wrote {out / f'bench-{tag}.json'}, {out / f'bench-{tag}.png'}")
    return 0


def memory_budget(model, mm, args, clock, samples) -> list[dict]:
    """Largest batch within the budget: memory model (what the process holds + KV) vs measured peaks.

    The measured search starts where a line through the grid's measured peaks crosses the budget and
    walks one batch at a time (prefill + 1 decode step per probe) until the next batch would not fit.
    """
    budget, text, results = args.memory_budget * GB, max(args.text_values), []
    fixed = reset_peak(model.device)  # what the process holds before a run: weights (+ runtime on CPU)
    print(
        f"\n--memory-budget {args.memory_budget:g} GB at {text} text tokens (+1 step); "
        f"held before a run {fixed / GB:.2f} GB"
    )
    for name, config in args.variants:
        r = 1.0 if config is None else config.keep_ratio
        kw = dict(text_tokens=text + 1, fixed_bytes=fixed, r=r, trim_first_layer_cache=args.trim_first_layer_cache)
        start = predicted = mm.largest_batch(budget, model.dtype, **kw)
        grid = [(s["batch"], s["peak_bytes"]) for s in samples if (s["text"], s["variant"]) == (text, name)]
        if len({b for b, _ in grid}) > 1:
            slope, intercept = statistics.linear_regression(*zip(*grid))
            start = int((budget - intercept) // slope) if slope > 0 else predicted
        peaks: dict[int, int] = {}

        def fits(batch: int, name=name, config=config, peaks=peaks) -> bool:
            try:
                inputs = make_inputs(model, mm, batch, text, args.seed)
                peaks[batch] = measure(model, [(name, config)], inputs, 1, clock)[name]["peak_bytes"]
            except torch.OutOfMemoryError:
                peaks[batch] = -1  # GPU: out of memory counts as "does not fit"
            return 0 <= peaks[batch] <= budget

        measured = largest_fitting(fits, start, args.max_batch)
        results.append({"variant": name, "predicted": predicted, "measured": measured, "start": start, "probes": peaks})
        probes = ", ".join(f"{b}: {p / GB:.2f} GB" for b, p in sorted(peaks.items()))
        print(
            f"  {name:>9}: largest batch predicted {predicted} (weights + KV only), measured {measured} "
            f"(probe peaks: {probes})",
            flush=True,
        )
    return results
