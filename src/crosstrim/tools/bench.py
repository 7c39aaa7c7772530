"""``crosstrim bench``: time to first token, decode time per token, throughput and peak memory, full vs
trimmed, in one run. One file, read top to bottom (gpt-fast style).

Without ``--model`` the model has the real layer dimensions of Llama-3.2-11B-Vision (``--dims 90b``: 90B)
with random weights at reduced depth (``--layers``), and it is fed precomputed image features of real size
(4 tiles x 1601 tokens), so no time goes to the vision encoder. Trimmed variants use an exact kept fraction
(``TrimConfig(keep_ratio=r)``) so every run keeps the same number of tokens; the paper's adaptive rule
(``--k-ratio``) is reported separately with the fraction it keeps on this model's features.
"""

from __future__ import annotations

import argparse
import ctypes
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
from crosstrim.tools import UserError, checkpoint
from crosstrim.tools.kv import fractions, ints, table

GB, MB = 1e9, 1e6


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency and memory, full vs trimmed, in one run")
    p.add_argument("--model", metavar="DIR", help="local checkpoint; without it: random weights, real layer dims")
    p.add_argument("--dims", default=None, help="layer dims of the random model: 11b (default), 90b, tiny (tests)")
    p.add_argument("--layers", type=int, help="text layers of the random model (default 4)")
    p.add_argument("--cross-layers", help="their cross-attention layers (default 3,8,.. if they fit, else 1,3,..)")
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
    p.add_argument("--image", metavar="FILE", help="with --model: real features from this image (else random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", metavar="DIR", help="JSON + PNG folder")
    p.add_argument("--tag", help="file name stem (default: from dims, device, dtype)")
    p.set_defaults(run=run)


# -- the model and its inputs ----------------------------------------------------------------------------


def random_model(dims: str, layers: int, cross: list[int], vocab: int, device, dtype, seed: int):
    """Real text-layer dims, random weights, a stub vision encoder that keeps the real tile geometry."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from crosstrim import tiny

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if dims == "tiny":
        config = tiny.tiny_config(vocab, text_layers=layers, cross_attention_layers=cross, **ids)
    else:
        base = memory.preset_config(dims)
        text = base.text_config.to_dict()
        text.update(num_hidden_layers=layers, cross_attention_layers=cross, vocab_size=vocab, **ids)
        v = base.vision_config  # unused (features are fed directly); only its tile geometry matters
        vision = {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_global_layers": 1,
            "attention_heads": 2,
            "intermediate_size": 64,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "max_num_tiles": v.max_num_tiles,
        }
        config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=vocab)
    torch.manual_seed(seed)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype)
    tiny.set_gates(model, 1.0)  # zero-initialised gates would make the image path a no-op
    return model.eval()


def image_features(model, processor, path: str):
    """``(n_tiles, tokens, hidden)`` features and the tile mask of one image, through the real encoder."""
    image = checkpoint.load_image(path)
    enc = processor(images=[[image]], text=["<|image|>"], return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.model.vision_model(
            pixel_values=enc["pixel_values"].to(model.dtype),
            aspect_ratio_ids=enc["aspect_ratio_ids"],
            aspect_ratio_mask=enc["aspect_ratio_mask"],
        ).last_hidden_state
        feats = model.model.multi_modal_projector(out).reshape(-1, out.shape[-2], model.config.text_config.hidden_size)
    return feats, enc["aspect_ratio_mask"][0, 0]


def make_inputs(model, mm: memory.MemoryModel, batch: int, text: int, seed: int, image=None) -> dict:
    """Random prompt tokens that all attend one image of ``max_tiles`` tiles, given as projected features."""
    gen = torch.Generator().manual_seed(seed + 1000 * batch + text)
    tc, device, dtype = model.config.text_config, model.device, model.dtype
    if image is None:
        feats = torch.randn(batch * mm.max_tiles, mm.tokens_per_tile, tc.hidden_size, generator=gen, dtype=dtype)
        tiles = torch.ones(mm.max_tiles, dtype=torch.long)
    else:
        feats, tiles = image[0].repeat(batch, 1, 1), image[1].cpu()
    ids = torch.randint(3, tc.vocab_size, (batch, text), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, text, dtype=torch.long, device=device),
        "cross_attention_states": feats.to(device),
        "cross_attention_mask": tiles.expand(batch, text, 1, mm.max_tiles).contiguous().to(device),
    }


# -- clocks, memory, hook timers --------------------------------------------------------------------------


class Clock:
    """Wall time for runs (GPU: synchronised); hook intervals as CUDA events so hooks never synchronise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
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
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024


def release_freed_memory() -> bool:
    """CPU: make glibc return large freed blocks to the OS, so the process's peak RSS is per run."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD = 1 MiB
    except OSError:
        return False


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    return _status("VmRSS")


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")


class Intervals:
    """Per decoder call: time inside crosstrim's hooks (``"hook"``) and each layer's time (``i``, hooks included).

    Timers go around crosstrim's hooks: ``prepend=True`` ones run before them, appended ones after. At the
    first cross layer the hook is scoring + selection (a forward hook); at later ones the gathers of
    features and mask (pre-hooks). Register after :func:`crosstrim.trim`.
    """

    def __init__(self, model, clock: Clock) -> None:
        text = model.model.language_model
        cross = sorted(text.config.cross_attention_layers)
        self.clock, self.calls, self._open, self._handles = clock, [], {}, []
        self._handles.append(text.register_forward_pre_hook(lambda *a: self.calls.append({})))
        first = text.layers[cross[0]]
        self._pair(first.register_forward_hook, first.register_forward_hook, "hook")
        for i in cross[1:]:
            self._pair(text.layers[i].register_forward_pre_hook, text.layers[i].register_forward_pre_hook, "hook")
        for i, layer in enumerate(text.layers):  # registered last: their prepended start runs first
            self._pair(layer.register_forward_pre_hook, layer.register_forward_hook, i)

    def _pair(self, register_start, register_stop, key) -> None:
        def start(*_):
            self._open[key] = self.clock.mark()

        def stop(*_):
            self.calls[-1].setdefault(key, []).append((self._open.pop(key), self.clock.mark()))

        self._handles += [register_start(start, prepend=True), register_stop(stop)]

    def seconds(self) -> list[dict]:
        self.clock.sync()
        return [{k: sum(self.clock.seconds(a, b) for a, b in v) for k, v in call.items()} for call in self.calls]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# -- one measurement: prefill, then decode steps on its cache --------------------------------------------


def cache_bytes(cache, cross_layers: list[int]) -> tuple[int, int]:
    sizes = [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]
    cross = sum(sizes[i] for i in cross_layers)
    return sum(sizes) - cross, cross


def busy_seconds() -> float:
    """CPU seconds every process has spent on the cores this process may run on (Linux ``/proc/stat``)."""
    cores = {f"cpu{c}" for c in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
    ticks = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in cores:  # user nice system idle iowait irq softirq steal ...
            ticks += sum(int(v) for i, v in enumerate(values[:8]) if i not in (3, 4))
    return ticks / os.sysconf("SC_CLK_TCK")


class Span:
    """Wall, process-CPU and other-process CPU time of one timed section (GPU: synchronised)."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.skip_other = clock, clock.cuda or not Path("/proc/stat").exists()

    def __enter__(self) -> Span:
        self.busy = 0.0 if self.skip_other else busy_seconds()
        self.cpu, self.start = time.process_time(), self.clock.now()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = self.clock.now() - self.start
        self.cpu = time.process_time() - self.cpu
        # Time other processes took on our cores: a contention check for a shared machine.
        self.other = 0.0 if self.skip_other else max(0.0, busy_seconds() - self.busy - self.cpu)


def timed_call(model, config: TrimConfig | None, clock: Clock, **inputs):
    """One forward pass, trimmed by ``config`` (hooks installed for this call only), and its greedy token."""
    handle = crosstrim.trim(model, config) if config is not None else None
    timers = Intervals(model, clock)
    try:
        with torch.inference_mode(), Span(clock) as span:
            result = model(**inputs, use_cache=True)
            token = result.logits[:, -1].argmax(-1, keepdim=True)
        call = timers.seconds()[0]
    finally:
        timers.remove()
        if handle is not None:
            handle.remove()
    return result.past_key_values, token, span, call, handle.stats if handle is not None else None


def measure(model, variants: list, inputs: dict, steps: int, clock: Clock) -> dict[str, dict]:
    """Prefill every variant (in the given order), then decode ``steps`` greedy steps, interleaving the
    variants step by step on their own caches, so slow drifts hit full and trimmed alike.

    Decode steps of a trimmed variant read the selection its prefill stored on its cache. Peak memory
    is per prefill, on top of what was held before the shape's first prefill (the other variants'
    caches held meanwhile do not count).
    """
    device, text = model.device, model.config.text_config
    layers = range(text.num_hidden_layers)
    state, out = {}, {}
    fixed = reset_peak(device)
    for name, config in variants:
        base = reset_peak(device)
        cache, token, span, call, stats = timed_call(model, config, clock, **inputs, logits_to_keep=1)
        kv_self, kv_cross = cache_bytes(cache, sorted(text.cross_attention_layers))
        out[name] = {
            "prefill_s": span.wall,
            "prefill_cpu_s": span.cpu,
            "prefill_other_cpu_s": span.other,
            "peak_bytes": fixed + peak(device) - base,
            "kv_self_bytes": kv_self,
            "kv_cross_bytes": kv_cross,
            "hook_prefill_s": call.get("hook", 0.0),
            "layer_prefill_s": [call[i] for i in layers],
            **({"kept": list(stats.kept_counts), "valid": list(stats.valid_counts)} if stats else {}),
            **{k: [] for k in ("decode_s", "decode_cpu_s", "decode_other_cpu_s", "hook_decode_s", "layer_decode")},
        }
        state[name] = (cache, token, inputs["attention_mask"])
    for _ in range(steps):
        for name, config in variants:
            cache, token, mask = state[name]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = {"attention_mask": mask, "cross_attention_mask": inputs["cross_attention_mask"][:, -1:]}
            _, token, span, call, _ = timed_call(model, config, clock, input_ids=token, past_key_values=cache, **step)
            state[name] = (cache, token, mask)
            for key, value in zip(
                ("decode_s", "decode_cpu_s", "decode_other_cpu_s"), (span.wall, span.cpu, span.other)
            ):
                out[name][key].append(value)
            out[name]["hook_decode_s"].append(call.get("hook", 0.0))
            out[name]["layer_decode"].append([call[i] for i in layers])
    for sample in out.values():  # per layer, the median over steps
        sample["layer_decode_s"] = [statistics.median(t) for t in zip(*sample.pop("layer_decode"))]
    return out


def largest_fitting(fits, start: int, limit: int) -> int:
    """Largest ``b <= limit`` with ``fits(b)`` (monotone), walking one batch at a time from ``start``.

    One step at a time, so no probe overshoots the budget by more than one sample's memory.
    """
    b = max(1, min(start, limit))
    if fits(b):
        while b < limit and fits(b + 1):
            b += 1
        return b
    while b > 1:
        b -= 1
        if fits(b):
            return b
    return 0


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
    med = statistics.median
    rows = []
    for text in args.text_values:
        for batch in args.batch_values:
            full = None
            for name, config in args.variants:
                runs = [s for s in samples if (s["text"], s["batch"], s["variant"]) == (text, batch, name)]
                prefill = [s["prefill_s"] for s in runs]
                decode = [t for s in runs for t in s["decode_s"]]
                row = {"text": text, "batch": batch, "variant": name, "runs": len(runs)}
                row.update(prefill_s=med(prefill), prefill_spread=spread(prefill))
                row.update(decode_s=med(decode), decode_spread=spread(decode), decode_tok_s=batch / med(decode))
                row.update(prefill_cpu_s=med(s["prefill_cpu_s"] for s in runs))
                row.update(decode_cpu_s=med(t for s in runs for t in s["decode_cpu_s"]))
                row["peak_bytes"] = med(s["peak_bytes"] for s in runs)
                wall = sum(s["prefill_s"] + sum(s["decode_s"]) for s in runs)
                other = sum(s["prefill_other_cpu_s"] + sum(s["decode_other_cpu_s"]) for s in runs)
                row["other_cpu_share"] = other / wall  # other processes on our cores, per second we ran
                row.update(kv_self_bytes=runs[0]["kv_self_bytes"], kv_cross_bytes=runs[0]["kv_cross_bytes"])
                r = 1.0 if config is None else config.keep_ratio
                common = {
                    "batch": batch,
                    "r": r,
                    "tiles": args.tiles,
                    "trim_first_layer_cache": args.trim_first_layer_cache,
                }
                expected = mm.kv_bytes(args.kv_dtype, text_tokens=text, **common)
                row["kv_matches_model"] = all(
                    (s["kv_self_bytes"], s["kv_cross_bytes"]) == (expected.self_attn, expected.cross_attn) for s in runs
                )
                if ref is not None:
                    row["prefill_full_depth_s"] = med(
                        at_depth(s["layer_prefill_s"], s["prefill_s"], mm, ref) for s in runs
                    )
                    row["decode_full_depth_s"] = med(
                        at_depth(s["layer_decode_s"], med(s["decode_s"]), mm, ref) for s in runs
                    )
                at = text + (args.decode_steps + 1) // 2  # mean decode position
                if config is None:
                    full = row
                    rows.append(row)
                    continue
                row["kept_fraction"] = statistics.mean(k / v for k, v in zip(runs[0]["kept"], runs[0]["valid"]))
                row["prefill_ratio"] = row["prefill_s"] / full["prefill_s"]
                row["decode_ratio"] = row["decode_s"] / full["decode_s"]
                row["decode_cpu_ratio"] = row["decode_cpu_s"] / full["decode_cpu_s"]
                row["decode_ratio_predicted"] = mm.decode_ratio(args.kv_dtype, text_tokens=at, **common)
                row["hook_prefill_s"] = med(s["hook_prefill_s"] for s in runs)
                row["scoring_share"] = row["hook_prefill_s"] / row["prefill_s"]
                row["hook_decode_s"] = med(t for s in runs for t in s["hook_decode_s"])
                if ref is not None:
                    row["prefill_ratio_full_depth"] = row["prefill_full_depth_s"] / full["prefill_full_depth_s"]
                    row["scoring_share_full_depth"] = row["hook_prefill_s"] / row["prefill_full_depth_s"]
                    row["decode_ratio_full_depth"] = row["decode_full_depth_s"] / full["decode_full_depth_s"]
                    row["decode_ratio_predicted_full_depth"] = ref.decode_ratio(args.kv_dtype, text_tokens=at, **common)
                rows.append(row)
    return rows


def render(rows: list[dict], cpu: bool) -> str:
    header = ["text", "batch", "variant", "kept", "prefill s", "±", "ratio", "decode ms", "±", "ratio", "predicted"]
    header += ["cpu-time ratio"] * cpu + ["tok/s", "peak GB", "KV GB", "scoring"]
    lines = []
    for r in rows:
        t = "decode_ratio" in r
        line = [
            r["text"],
            r["batch"],
            r["variant"],
            f"{r.get('kept_fraction', 1.0):.1%}",
            f"{r['prefill_s']:.3f}",
            f"{r['prefill_spread']:.0%}",
            f"{r['prefill_ratio']:.3f}" if t else "",
            f"{r['decode_s'] * 1e3:.1f}",
            f"{r['decode_spread']:.0%}",
            f"{r['decode_ratio']:.3f}" if t else "",
            f"{r['decode_ratio_predicted']:.3f}" if t else "",
        ]
        line += [f"{r['decode_cpu_ratio']:.3f}" if t else ""] * cpu
        line += [f"{r['decode_tok_s']:.1f}", f"{r['peak_bytes'] / GB:.2f}"]
        line += [f"{(r['kv_self_bytes'] + r['kv_cross_bytes']) / GB:.3f}", f"{r['scoring_share']:.2%}" if t else ""]
        lines.append(line)
    return table(header, lines)


def render_full_depth(rows: list[dict], ref: memory.MemoryModel) -> str:
    header = ["text", "batch", "variant", "prefill ratio", "scoring share", "decode ratio", "predicted"]
    lines = [
        [
            r["text"],
            r["batch"],
            r["variant"],
            f"{r['prefill_ratio_full_depth']:.3f}",
            f"{r['scoring_share_full_depth']:.2%}",
            f"{r['decode_ratio_full_depth']:.3f}",
            f"{r['decode_ratio_predicted_full_depth']:.3f}",
        ]
        for r in rows
        if "decode_ratio" in r
    ]
    return table(header, lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Prefill, decode step and decode ratio (measured o, predicted x) vs batch; one line style per text length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    texts, batches = sorted({r["text"] for r in rows}), sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    for t, text in enumerate(texts):
        for v, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            sel = [r for r in rows if r["text"] == text and r["variant"] == name]
            xs, style = [r["batch"] for r in sel], {"color": f"C{v}", "ls": ["-", "--", ":", "-."][t % 4]}
            axes[0].plot(xs, [r["prefill_s"] for r in sel], marker="o", label=f"{name}, {text} text tokens", **style)
            axes[1].plot(xs, [r["decode_s"] * 1e3 for r in sel], marker="o", **style)
            if "decode_ratio" in sel[0]:
                axes[2].plot(xs, [r["decode_ratio"] for r in sel], marker="o", **style)
                axes[2].plot(xs, [r["decode_ratio_predicted"] for r in sel], marker="x", alpha=0.4, **style)
    labels = ("prefill (time to first token), s", "decode, ms per step", "decode trimmed/full: o measured, x predicted")
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


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"model name\s*:\s*(.*)", cpuinfo.read_text())
        info["cpu"] = names[0] if names else platform.processor()
    info["torch_threads"] = torch.get_num_threads()
    if Path("/proc/loadavg").exists():
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse(args) -> None:
    """Validate everything before loading anything; errors become one-line UserErrors."""
    args.batch_values = ints(args.batch, "--batch")
    args.text_values = ints(args.text, "--text")
    args.keep_values = fractions(args.keep)
    args.k_values = fractions(args.k_ratio, "--k-ratio") if args.k_ratio else []
    for name in ("decode_steps", "repeats", "max_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise UserError("--memory-budget must be a positive number of GB")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.model is not None:
        given = [n for n in ("dims", "layers", "cross_layers", "vocab") if getattr(args, n) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} shapes the random model; drop it with --model")
    else:
        if args.image:
            raise UserError("--image needs --model (the random model has no trained vision encoder)")
        args.dims = (args.dims or "11b").lower()
        if args.dims not in (*memory.PRESETS, "tiny"):
            raise UserError(f"unknown --dims {args.dims!r}; choose 11b, 90b or tiny")
        args.layers = 4 if args.layers is None else args.layers
        if args.cross_layers is None:
            cross = list(range(3, args.layers, 5))
            args.cross_values = cross if len(cross) >= 2 else list(range(1, args.layers, 2))
        else:
            try:
                args.cross_values = sorted({int(v) for v in args.cross_layers.split(",") if v.strip()})
            except ValueError as err:
                raise UserError(
                    f"--cross-layers must be comma-separated layer indices, got {args.cross_layers!r}"
                ) from err
        if len(args.cross_values) < 2 or not all(0 <= i < args.layers for i in args.cross_values):
            raise UserError(
                f"the random model needs >= 2 cross-attention layers inside its {args.layers} layers "
                f"(got {args.cross_values}); raise --layers (4 gives cross layers 1,3) or fix --cross-layers"
            )
        args.vocab = args.vocab or (512 if args.dims == "tiny" else 16384)
        if args.vocab < 8:
            raise UserError("--vocab must be at least 8")
    args.variants = [("full", None)] + [
        (f"keep {r:g}", TrimConfig(keep_ratio=r, trim_first_layer_cache=args.trim_first_layer_cache))
        for r in args.keep_values
        if r < 1.0
    ]
    if len(args.variants) < 2:
        raise UserError("--keep needs at least one fraction below 1 to compare against the full model")


def load(args, device: torch.device):
    """``(model, description, image features or None)`` from a checkpoint or built with random weights."""
    if args.model is not None:
        model, processor = checkpoint.load(args.model, str(device), args.dtype)
        image = image_features(model, processor, args.image) if args.image else None
        what = f"features of {args.image}" if image is not None else "random image features of real size"
        return model, f"checkpoint {args.model}, {what}", image
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif args.dtype in checkpoint.DTYPES:
        dtype = checkpoint.DTYPES[args.dtype]
    else:
        raise UserError(f"unknown dtype {args.dtype!r}; use one of auto, {', '.join(checkpoint.DTYPES)}")
    print(f"building random {args.dims} model: {args.layers} layers, cross {args.cross_values} ...", flush=True)
    model = random_model(args.dims, args.layers, args.cross_values, args.vocab, device, dtype, args.seed)
    dims = "tiny test" if args.dims == "tiny" else f"real Llama-3.2-{args.dims.upper()}-Vision"
    mm = memory.MemoryModel.from_config(model.config)
    return (
        model,
        (
            f"RANDOM WEIGHTS, {dims} layer dimensions, reduced depth: {args.layers} text layers with cross-attention "
            f"at {args.cross_values}, vocabulary {args.vocab}; fed random precomputed image features of the config's "
            f"size ({mm.max_tiles} tiles x {mm.tokens_per_tile} tokens) instead of running the vision encoder"
        ),
        None,
    )


def run(args: argparse.Namespace) -> int:
    parse(args)
    device = checkpoint.resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu = device.type == "cpu"
    if cpu:
        if not Path("/proc/self/clear_refs").exists():
            raise UserError("peak memory on CPU needs Linux /proc; run on Linux or use --device cuda")
        args.mallopt = release_freed_memory()
        free = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) * 1024
        if args.memory_budget and args.memory_budget * GB > _status("VmRSS") + free:
            raise UserError(f"--memory-budget {args.memory_budget:g} GB exceeds the {free / GB:.1f} GB available")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {str(out)!r}: {err}") from err
    clock, machine_info = Clock(device), machine(device)
    model, source, image = load(args, device)
    mm = memory.MemoryModel.from_config(model.config, name=args.tag or "bench")
    # Full-depth view: the measured layers composed to the preset's depth (random model only).
    ref = memory.preset(args.dims) if args.model is None and args.dims in memory.PRESETS else None
    args.kv_dtype, args.tiles = model.dtype, mm.max_tiles if image is None else int(image[1].sum())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    threads = f"{torch.get_num_threads()} thread(s)" if cpu else "GPU, synchronised timings"
    print(f"model: {source}")
    print(f"device: {device} ({threads}), dtype {model.dtype}, weights {weights / GB:.2f} GB")

    # The paper's adaptive rule, for reference: the fraction it keeps on these features.
    adaptive = {}
    small = make_inputs(model, mm, args.batch_values[0], args.text_values[0], args.seed, image)
    for k in args.k_values:
        with crosstrim.trimmed(model, TrimConfig(k_ratio=k)) as handle, torch.inference_mode():
            model(**small, use_cache=True, logits_to_keep=1)
        adaptive[f"{k:g}"] = handle.stats.mean_kept_fraction
        print(f"trimmed k_ratio={k:g} (paper rule, adaptive) keeps {adaptive[f'{k:g}']:.1%} of image tokens here")

    warmup = args.warmup if args.warmup is not None else (0 if cpu else 1)
    print("warm-up: every variant once at the first shape" + (f", then {warmup} per shape" if warmup else ""))
    measure(model, args.variants, small, 1, clock)
    del small
    samples, started = [], time.perf_counter()
    for text in args.text_values:
        for batch in args.batch_values:
            inputs = make_inputs(model, mm, batch, text, args.seed, image)
            for _ in range(warmup):
                measure(model, args.variants, inputs, 1, clock)
            for rep in range(args.repeats):  # variants alternate; the order flips every repeat
                order = args.variants if rep % 2 == 0 else args.variants[::-1]
                for name, sample in measure(model, order, inputs, args.decode_steps, clock).items():
                    samples.append({"text": text, "batch": batch, "variant": name, "repeat": rep, **sample})
            del inputs
            done = [s for s in samples if (s["text"], s["batch"]) == (text, batch)]
            step = {
                n: statistics.median(t for s in done if s["variant"] == n for t in s["decode_s"])
                for n, _ in args.variants
            }
            line = ", ".join(f"{n} {t * 1e3:.0f}" for n, t in step.items())
            print(
                f"  text {text:>4} batch {batch:>3}: decode ms/step {line}  [{time.perf_counter() - started:.0f} s]",
                flush=True,
            )

    rows = summarise(samples, mm, ref, args)
    print(f"\nMeasured on {source}; {device}, {threads}, {model.dtype}.")
    print(render(rows, cpu))
    print(
        f"prefill = time to first token, s; decode = ms per step (median of {args.repeats} runs x {args.decode_steps} "
        "steps, variants interleaved step by step); ± = (max-min)/median; ratio = trimmed/full of medians; "
        "predicted = bytes-moved model (W + B(S + C_r)) / (W + B(S + C))"
        + ("; cpu-time ratio = the decode ratio from process CPU time (insensitive to time-slicing)" if cpu else "")
        + "; peak = memory held before the shape + this prefill's peak; scoring = crosstrim hook time / prefill."
    )
    w = mm.decode_weight_bytes(model.dtype)
    print(
        f"bytes-moved model: W = {w / GB:.2f} GB of weights read per step; per sample C = "
        f"{mm.cross_kv_bytes(model.dtype) / MB:.1f} MB cross KV, S = {mm.self_kv_bytes(1, model.dtype) / 1e3:.1f} kB "
        f"self KV per text token; first cross layer {'trimmed' if args.trim_first_layer_cache else 'kept full'}."
    )
    if ref is not None:
        print(
            f"\nEstimated at full {ref.name} depth ({ref.layers} layers, {ref.n_cross} cross): measured layer "
            f"times composed ({ref.n_self} x self layer, first cross layer, {ref.n_cross - 1} x later cross "
            "layer); predicted = bytes-moved model at full depth."
        )
        print(render_full_depth(rows, ref))
    ok = all(r["kv_matches_model"] for r in rows)
    print(f"KV cache bytes after prefill == memory model (self and cross, every run): {'yes' if ok else 'NO'}")
    if cpu:
        shares = [r["other_cpu_share"] for r in rows]
        print(
            f"other processes on our core(s) while we ran: median {statistics.median(shares):.1%}, "
            f"worst shape {max(shares):.1%} of our wall time"
        )
    budget = memory_budget(model, mm, args, clock, image, samples) if args.memory_budget else None

    if Path("/proc/loadavg").exists():
        machine_info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "argv": sys.argv,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": source,
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "variants", "kv_dtype")},
        "dims": {
            k: getattr(mm, k)
            for k in (
                "layers",
                "cross_layers",
                "hidden",
                "heads",
                "kv_heads",
                "intermediate",
                "vocab",
                "tokens_per_tile",
                "max_tiles",
            )
        },
        "dtype": str(model.dtype),
        "weights_bytes": weights,
        "decode_weight_bytes": w,
        "versions": {
            "crosstrim": crosstrim.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "machine": machine_info,
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


def memory_budget(model, mm, args, clock, image, samples) -> list[dict]:
    """Largest batch within the budget: memory model (what the process holds + KV) vs measured peaks.

    The measured search starts where a line through the grid's measured peaks crosses the budget and
    walks one batch at a time (prefill + 1 decode step per probe) until the next batch would not fit.
    """
    budget, text, device = args.memory_budget * GB, max(args.text_values), model.device
    fixed = reset_peak(device)  # what the process holds before a run: weights (+ runtime on CPU)
    results = []
    print(
        f"\n--memory-budget {args.memory_budget:g} GB at {text} text tokens (+1 step); held before a run "
        f"{fixed / GB:.2f} GB"
    )
    for name, config in args.variants:
        r = 1.0 if config is None else config.keep_ratio
        predicted = mm.largest_batch(
            budget,
            model.dtype,
            text_tokens=text + 1,
            fixed_bytes=fixed,
            r=r,
            trim_first_layer_cache=args.trim_first_layer_cache,
        )
        grid = [(s["batch"], s["peak_bytes"]) for s in samples if (s["text"], s["variant"]) == (text, name)]
        start = predicted
        if len({b for b, _ in grid}) > 1:
            slope, intercept = statistics.linear_regression(*zip(*grid))
            start = int((budget - intercept) // slope) if slope > 0 else predicted
        peaks: dict[int, int] = {}

        def fits(batch: int, name=name, config=config, peaks=peaks) -> bool:
            try:
                inputs = make_inputs(model, mm, batch, text, args.seed, image)
                peaks[batch] = measure(model, [(name, config)], inputs, 1, clock)[name]["peak_bytes"]
            except torch.OutOfMemoryError:
                peaks[batch] = -1
            return 0 <= peaks[batch] <= budget

        measured = largest_fitting(fits, start, args.max_batch)
        results.append({"variant": name, "predicted": predicted, "measured": measured, "start": start, "probes": peaks})
        print(
            f"  {name:>9}: largest batch predicted {predicted} (weights + KV only), measured {measured} "
            f"(probe peaks: {', '.join(f'{b}: {p / GB:.2f} GB' for b, p in sorted(peaks.items()))})",
            flush=True,
        )
    return results
