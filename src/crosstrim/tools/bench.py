"""``crosstrim bench``: time to first token, decode time per token, throughput and peak memory, full vs
trimmed, in one run; with ``--memory-budget``, the largest batch each variant fits and its throughput there.
Method and results: docs/benchmarks.md. The measuring lives in :mod:`crosstrim.bench` (read in this order:
``measure`` (clocks, one measurement), ``summary`` (rows, full-depth composition), ``vision`` (the vision
encoder at real dimensions), ``capacity`` (the memory-budget search)); this module is the command: options,
the run, tables and plots.

Without ``--model`` the model has the real layer dimensions of Llama-3.2-11B-Vision (``--dims 90b``: 90B)
with random weights at reduced depth (``--layers``). The latency grid feeds it precomputed image features of
real size (4 tiles x 1601 tokens), so its prefill is the decoder's; the vision encoder is timed apart at real
dimensions and added for the end-to-end time to first token. Trimmed variants use an exact kept fraction
(``TrimConfig(keep_ratio=r)``) so every run keeps the same number of tokens; the paper's adaptive rule
(``--k-ratio``) is reported with the fraction it keeps on this model's features, and searched in the budget.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
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
from crosstrim.bench import capacity
from crosstrim.bench.measure import Clock, make_inputs, measure, random_model, status_bytes
from crosstrim.bench.summary import summarise
from crosstrim.bench.vision import time_vision
from crosstrim.cli.options import fractions, ints, table
from crosstrim.core import TrimConfig
from crosstrim.engine import memory
from crosstrim.evaluation import UserError, checkpoint, versions

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
    p.add_argument("--prefill-batch", type=int, default=1, help="samples per prefill micro-batch in the search (1)")
    p.add_argument("--full-depth-budget", type=float, default=80.0, metavar="GB", help="composed estimate's budget")
    p.add_argument("--real-vision", action="store_true", help="random model with the preset's full vision encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", metavar="DIR", help="JSON + PNG folder")
    p.add_argument("--tag", help="file name stem (default: from dims or checkpoint, and device)")
    p.set_defaults(run=run)


# -- tables and plots --------------------------------------------------------------------------------------


# Printed tables, "header=format" per column; a cell whose key its row lacks (the full rows' ratios) is blank.
COLUMNS = (
    "text={text}|batch={batch}|variant={variant}|kept={kept_fraction:.1%}|prefill s={prefill_s:.3f}"
    "|±={prefill_spread:.0%}|ratio={prefill_ratio:.3f}|decode ms={decode_ms:.1f}|±={decode_spread:.0%}"
    "|ratio={decode_ratio:.3f}|predicted={decode_ratio_predicted:.3f}|cpu-time ratio={decode_cpu_ratio:.3f}"
    "|tok/s={decode_tok_s:.1f}|peak GB={peak_gb:.2f}|KV GB={kv_gb:.3f}|scoring={scoring_share:.2%}"
)
FULL_DEPTH = (
    "text={text}|batch={batch}|variant={variant}|prefill ratio={prefill_ratio_full_depth:.3f}"
    "|TTFT ratio with vision={ttft_ratio_full_depth:.3f}|scoring share={scoring_share_full_depth:.2%}"
    "|decode ratio={decode_ratio_full_depth:.3f}|predicted={decode_ratio_predicted_full_depth:.3f}"
)
CAPACITY = (
    "variant={variant}|kept={kept_fraction:.1%}|predicted={predicted}|measured={measured}|off={off:+.0%}"
    "|ratio={batch_ratio:.2f}|predicted ratio={batch_ratio_predicted:.2f}|TTFT s={ttft_s:.1f}"
    "|decode ms={decode_ms:.0f}|tok/s={tok_s:.2f}|tok/s ratio={tok_s_ratio:.2f}|bytes-moved={tok_s_ratio_predicted:.2f}"
    "|KV MB={kv_mb:.1f}|inputs MB={inputs_mb:.1f}|transient GB={transient_gb:.2f}|merge MB={merge_mb:.1f}"
)
COMPOSED = (
    "variant={variant}|kept={kept_fraction:.1%}|batch={batch}|ratio={batch_ratio:.2f}|decode s={decode_s:.2f}"
    "|tok/s={tok_s:.1f}|tok/s ratio={tok_s_ratio:.2f}|bytes-moved ratio={tok_s_ratio_bytes_moved:.2f}"
    "|KV MB={kv_mb:.1f}|transient GB={transient_gb:.2f}|merge MB={merge_mb:.1f}"
)


def units(row: dict) -> dict:
    """The row plus its printed units (ms, MB, GB) for the keys it has."""
    fp, extra = row.get("footprint", {}), {}
    if "kv_self_bytes" in row:
        extra["kv_gb"] = (row["kv_self_bytes"] + row["kv_cross_bytes"]) / GB
    if "peak_bytes" in row:
        extra["peak_gb"] = row["peak_bytes"] / GB
    if "decode_s" in row:
        extra["decode_ms"] = row["decode_s"] * 1e3
    if fp:
        extra |= {"kv_mb": fp["kv"] / MB, "inputs_mb": fp["inputs"] / MB, "merge_mb": fp["merge"] / MB}
        extra["transient_gb"] = fp["transient"] / GB
    if row.get("predicted") and not row.get("capped"):
        extra["off"] = row["measured"] / row["predicted"] - 1
    if "ttft_s" in row.get("at_largest", {}):
        extra["ttft_s"] = row["at_largest"]["ttft_s"]
    return row | extra


def render(rows: list[dict], columns: str) -> str:
    """``columns`` ("header=format|..."), one line per row; a cell whose key the row lacks is blank."""

    def cell(r: dict, fmt: str) -> str:
        try:
            return fmt.format_map(r)
        except KeyError:
            return ""

    header, formats = zip(*(c.split("=", 1) for c in columns.split("|")))
    return table(list(header), [[cell(units(r), fmt) for fmt in formats] for r in rows])


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
    positive = (("decode_steps", 1), ("repeats", 1), ("max_batch", 1), ("threads", 1), ("warmup", 0))
    for name, least in (*positive, ("prefill_batch", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}")
    for name in ("memory_budget", "full_depth_budget"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number of GB")
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
    if args.real_vision and (args.model is not None or args.dims not in memory.PRESETS):
        raise UserError("--real-vision builds a preset's vision encoder: use it with --dims 11b or 90b, no --model")
    configs = [TrimConfig(keep_ratio=r, trim_first_layer_cache=args.trim_first_layer_cache) for r in args.keep_values]
    args.variants = [("full", None)] + [(f"keep {c.keep_ratio:g}", c) for c in configs if c.keep_ratio < 1]
    if len(args.variants) < 2:
        raise UserError("--keep needs at least one fraction below 1 to compare against the full model")
    adaptive = [TrimConfig(k_ratio=k, trim_first_layer_cache=args.trim_first_layer_cache) for k in args.k_values]
    args.budget_variants = args.variants + [(f"k_ratio {c.k_ratio:g}", c) for c in adaptive]
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
        if args.memory_budget and args.memory_budget * GB > status_bytes("VmRSS") + free:
            raise UserError(f"--memory-budget {args.memory_budget:g} GB exceeds the {free / GB:.1f} GB available")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {str(out)!r}: {err}") from err
    machine = machine_info(device)

    if args.model is not None:
        model, source = checkpoint.load(args.model, str(device), args.dtype)[0], f"checkpoint {args.model}"
    else:
        print(f"building random {args.dims} model: {args.layers} layers, cross {args.cross_values} ...", flush=True)
        model = random_model(
            args.dims, args.layers, args.cross_values, args.vocab, device, dtype, args.seed, args.real_vision
        )
        dims = "tiny test" if args.dims == "tiny" else f"real Llama-3.2-{args.dims.upper()}-Vision"
        depth = f"{args.layers} text layers with cross-attention at {args.cross_values}, vocabulary {args.vocab}"
        source = f"RANDOM WEIGHTS, {dims} layer dimensions, reduced depth: {depth}"
        source += ", full vision encoder" if args.real_vision else ", tiny vision encoder with the real tile geometry"
    mm, args.kv_dtype = memory.MemoryModel.from_config(model.config, name=args.tag or "bench"), model.dtype
    size = f"{mm.max_tiles} tiles x {mm.tokens_per_tile} tokens"
    source += f"; fed random precomputed image features of the config's size ({size}) in the latency grid"
    source += ", random pixels in the budget search" if args.memory_budget else ""
    # Full-depth view: the measured layers composed to the preset's depth (random model only).
    ref = memory.preset(args.dims) if args.model is None and args.dims in memory.PRESETS else None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    threads = f"{torch.get_num_threads()} thread(s)" if cpu else "GPU, synchronised timings"
    print(f"model: {source}\ndevice: {device} ({threads}), dtype {model.dtype}, weights {weights / GB:.2f} GB")

    clock = Clock(device)
    adaptive, samples = grid(model, mm, args, clock)
    vision = None
    if ref is not None:
        print(f"vision encoder: timing one local and one global layer at real {ref.name} dimensions ...", flush=True)
        vision = time_vision(memory.preset_config(args.dims), device, model.dtype, args.repeats, clock)
    rows, w = summarise(samples, mm, ref, args, vision and vision["seconds_per_image"]), mm.decode_weight_bytes(dtype)
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
        print_full_depth(rows, ref, vision)
    ok = all(r["kv_matches_model"] for r in rows)
    print(f"KV cache bytes after prefill == memory model (self and cross, every run): {'yes' if ok else 'NO'}")
    if cpu:
        shares = [r["other_cpu_share"] for r in rows]
        print(
            f"other processes on our core(s) while we ran: median {statistics.median(shares):.1%}, "
            f"worst shape {max(shares):.1%} of our wall time"
        )
    budget = composed = None
    if args.memory_budget:
        budget = capacity.search(model, mm, args.budget_variants, args, clock)
        if ref is not None:
            composed = capacity.compose(budget, mm, ref, args, model.dtype, weights, vision)
        print_capacity(budget, composed, mm, ref, args, vision)

    machine["loadavg_end"] = os.getloadavg()
    result = {
        "argv": sys.argv,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": source,
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "variants", "budget_variants", "kv_dtype")},
        "dims": dataclasses.asdict(mm) | {"tokens_per_tile": mm.tokens_per_tile},
        "dtype": str(model.dtype),
        "weights_bytes": weights,
        "decode_weight_bytes": w,
        "versions": versions(),
        "machine": machine,
        "adaptive_kept_fraction": adaptive,
        "summary": rows,
        "vision_encoder": vision,
        "memory_budget": budget,
        "memory_budget_full_depth_composed": composed,
        "samples": samples,
    }
    tag = args.tag or (Path(args.model).name if args.model else f"{args.dims}-L{args.layers}") + f"-{device.type}"
    (out / f"bench-{tag}.json").write_text(json.dumps(result, indent=1))
    title = textwrap.fill(f"{source}; {device}, {threads}, {model.dtype}", 160)
    plot(rows, out / f"bench-{tag}.png", title)
    written = [out / f"bench-{tag}.json", out / f"bench-{tag}.png"]
    if budget:
        plot_capacity(budget, out / f"bench-{tag}-capacity.png", title)
        written.append(out / f"bench-{tag}-capacity.png")
    print("wrote " + ", ".join(map(str, written)))
    return 0


def machine_info(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    machine["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    machine["cpu"] = (re.findall(r"model name\s*:\s*(.*)", cpuinfo) or [platform.processor()])[0]
    machine["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    machine["torch_threads"], machine["loadavg_start"] = torch.get_num_threads(), os.getloadavg()
    return machine


def grid(model, mm: memory.MemoryModel, args, clock: Clock) -> tuple[dict, list[dict]]:
    """The latency grid: every (text, batch) shape, every variant, ``--repeats`` times; and the share of image
    tokens the paper's adaptive rule keeps on these features."""
    adaptive, small = {}, make_inputs(model, mm, args.batch_values[0], args.text_values[0], args.seed)
    for k in args.k_values:  # the paper's adaptive rule, for reference: the fraction it keeps on these features
        with crosstrim.trimmed(model, TrimConfig(k_ratio=k)) as handle, torch.inference_mode():
            model(**small, use_cache=True, logits_to_keep=1)
        adaptive[f"{k:g}"] = handle.stats.mean_kept_fraction
        print(f"trimmed k_ratio={k:g} (paper rule, adaptive) keeps {adaptive[f'{k:g}']:.1%} of image tokens here")
    warmup = args.warmup if args.warmup is not None else (1 if clock.cuda else 0)
    print("warm-up: every variant once at the first shape" + (f", then {warmup} per shape" if warmup else ""))
    measure(model, args.variants, small, 1, clock)
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
    return adaptive, samples


def print_full_depth(rows: list[dict], ref: memory.MemoryModel, vision: dict) -> None:
    t = vision["measured_s"]
    print(
        f"\nEstimated at full {ref.name} depth ({ref.layers} layers, {ref.n_cross} cross): measured layer times "
        f"composed ({ref.n_self} x self layer, first cross layer, {ref.n_cross - 1} x later cross layer); "
        "predicted = bytes-moved model at full depth; prefill ratio = decoder only; TTFT ratio with vision = "
        "(vision encoder + projector + decoder prefill), trimmed / full.\n"
        f"vision encoder at real {ref.name} dimensions ({vision['layers']['local']} local + "
        f"{vision['layers']['global']} global layers of width {vision['hidden']}, {vision['tokens_per_image']} tokens "
        f"per image), composed from one local layer {t['local']:.3f} s, one global layer {t['global']:.3f} s, "
        f"the rest {t['rest']:.3f} s, projector {t['projector']:.3f} s: {vision['seconds_per_image']:.2f} s per "
        "image, times the batch (assumed linear).\n" + render([r for r in rows if "decode_ratio" in r], FULL_DEPTH)
    )


def print_capacity(budget: list[dict], composed, mm, ref, args, vision) -> None:
    print(
        f"\nCapacity within {args.memory_budget:g} GB, measured on this model ({mm.layers} layers, cross "
        f"{list(mm.cross_layers)}): predicted = largest B with held + B (KV + inputs) + max(transient, B merge) "
        "<= budget (transient measured on one micro-batch alone); measured = largest B whose run peaked within "
        "the budget; ratio = trimmed / full; tok/s at the measured batch; bytes-moved = tok/s ratio predicted by "
        "bytes moved per step.\n" + render(budget, CAPACITY)
    )
    if budget[0]["kv_matches_model"] is not None:
        same = all(r["kv_matches_model"] is not False for r in budget)
        print(f"KV cache bytes of every calibration run == memory model: {'yes' if same else 'NO'}")
    if composed is not None:
        print(
            f"\nComposed, not measured: full {ref.name} depth ({ref.layers} layers, all weights incl. the vision "
            f"encoder), {args.full_depth_budget:g} GB, {args.dims} KV from the memory model, transient = max(measured "
            f"here, real vision encoder composed: {vision['transient_bytes'] / GB:.2f} GB); decode s and tok/s from "
            "per-layer decode times measured at the budget batches above, fitted linearly in batch (and kept tokens) "
            "and composed to full depth; bytes-moved ratio = tok/s ratio a memory-bound device would give.\n"
            + render(composed, COMPOSED)
        )


def plot_capacity(budget: list[dict], path: Path, title: str) -> None:
    """Largest batch (predicted, measured) and decode tokens/s at it, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, xs = [r["variant"] for r in budget], range(len(budget))
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    ax_b.bar([x - 0.2 for x in xs], [r["predicted"] for r in budget], width=0.4, label="predicted")
    ax_b.bar([x + 0.2 for x in xs], [r["measured"] for r in budget], width=0.4, label="measured")
    ax_t.bar(xs, [r.get("tok_s", 0) for r in budget], color="C2")
    for ax, label in ((ax_b, "largest batch within the budget"), (ax_t, "decode tokens/s at the measured batch")):
        ax.set_xticks(list(xs), names, fontsize=8)
        ax.set_ylabel(label)
    ax_b.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
