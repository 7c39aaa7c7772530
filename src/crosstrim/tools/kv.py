"""``crosstrim kv``: the KV-cache memory model (paper Fig. 3) as tables and PNG plots, from a config alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crosstrim.cli.options import fractions, ints, table
from crosstrim.engine import memory
from crosstrim.evaluation import UserError

# Decimal byte units, largest first: every table and plot picks the one that fits its largest number.
UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0))


def unit_for(values) -> tuple[str, float]:
    """The largest unit in which the largest of ``values`` (bytes) is at least 1, e.g. ``("MB", 1e6)``."""
    largest = max(values, default=0)
    return next(((name, size) for name, size in UNITS if largest >= size), UNITS[-1])


def scaled(value: float) -> str:
    """``value`` bytes in the unit that fits it, e.g. ``'52.2 KB'``."""
    name, size = unit_for([value])
    return f"{value / size:.4g} {name}"


def register(subparsers) -> None:
    parser = subparsers.add_parser("kv", help="KV-cache bytes, full vs trimmed (paper Fig. 3); no weights needed")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="local checkpoint folder (only config.json is read)")
    source.add_argument("--preset", help="published config: 11b (default) or 90b")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="cache dtype: fp32/float32, bf16/bfloat16, fp16/float16, fp8 or auto (default: bf16, as on GPU)",
    )
    parser.add_argument("--keep", default="0.5,0.25,0.1", help="kept fractions r to compare (default 0.5,0.25,0.1)")
    parser.add_argument("--batch", default="1,2,4,8,16,32,64", help="batch sizes of table (a)")
    parser.add_argument("--text-tokens", type=int, default=128, help="text length of table (a) (default 128)")
    parser.add_argument(
        "--lengths", default="128,256,512,1024,2048,4096,8192", help="text lengths of table (b), batch 1"
    )
    parser.add_argument("--images", type=int, default=1, help="images per sample (default 1, 4 tiles each)")
    parser.add_argument(
        "--trim-first-layer-cache", action="store_true", help="also count the first cross layer's cache as trimmed"
    )
    parser.add_argument("--out", default="runs/kv", metavar="DIR", help="where PNG + JSON go (default runs/kv)")
    parser.add_argument("--no-plot", action="store_true", help="print the tables only")
    parser.set_defaults(run=run)


def load_model(model_dir: str | None, preset: str | None) -> memory.MemoryModel:
    """The memory model of a checkpoint's ``config.json`` or of a preset (default 11b)."""
    if model_dir is None:
        try:
            return memory.preset(preset or "11b")
        except ValueError as err:
            raise UserError(str(err)) from err
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} has no config.json; pass a checkpoint folder or --preset 11b|90b")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path / 'config.json'}: {err}") from err
    if config.get("model_type") != "mllama":
        raise UserError(f"{str(path)!r} holds a {config.get('model_type')!r} model; crosstrim needs mllama")
    try:
        return memory.MemoryModel.from_config(config, name=path.name)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path / 'config.json'} lacks an Mllama field: {err}") from err


def compute(model: memory.MemoryModel, args: argparse.Namespace) -> dict:
    """Every number the tables and plots show, in bytes."""
    keep, dtype, first = args.keep_values, args.dtype, args.trim_first_layer_cache

    def row(batch: int, tokens: int) -> dict:
        kv = model.kv_bytes(dtype, batch=batch, text_tokens=tokens, images=args.images)
        cross = {
            f"{r:g}": model.cross_kv_bytes(dtype, batch=batch, images=args.images, r=r, trim_first_layer_cache=first)
            for r in keep
        }
        return {
            "batch": batch,
            "text_tokens": tokens,
            "self": kv.self_attn,
            "cross_full": kv.cross_attn,
            "cross": cross,
        }

    crossover = {"full": model.crossover_tokens(dtype, images=args.images)}
    for r in keep:
        crossover[f"{r:g}"] = model.crossover_tokens(dtype, images=args.images, r=r, trim_first_layer_cache=first)
    return {
        "model": model.name,
        "dtype": dtype,
        "element_size": memory.element_size(dtype),
        "layers": model.layers,
        "cross_layers": list(model.cross_layers),
        "kv_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "tokens_per_tile": model.tokens_per_tile,
        "max_tiles": model.max_tiles,
        "images": args.images,
        "trim_first_layer_cache": first,
        "self_kv_bytes_per_text_token": model.self_kv_bytes(1, dtype),
        "cross_kv_bytes_per_image": model.cross_kv_bytes(dtype),
        "cross_kv_bytes_per_image_kept": {
            f"{r:g}": model.cross_kv_bytes(dtype, r=r, trim_first_layer_cache=first) for r in keep
        },
        "crossover_text_tokens": crossover,
        "vs_batch": [row(b, args.text_tokens) for b in args.batch_values],
        "vs_text": [row(1, n) for n in args.length_values],
    }


def render(result: dict) -> str:
    keep = list(result["cross_kv_bytes_per_image_kept"])
    first = "all" if result["trim_first_layer_cache"] else "later"
    lines = [
        f"KV-cache model of {result['model']} ({result['dtype']}, {result['element_size']} B/element), from its "
        f"config: {result['layers']} layers, {len(result['cross_layers'])} cross-attention "
        f"({', '.join(map(str, result['cross_layers']))}), {result['kv_heads']} KV heads x {result['head_dim']}, "
        f"{result['max_tiles']} tiles x {result['tokens_per_tile']} tokens per image slot.",
        f"self-attention KV per text token: {result['self_kv_bytes_per_text_token']:,} B",
        f"cross-attention KV per image:     {result['cross_kv_bytes_per_image']:,} B "
        f"({scaled(result['cross_kv_bytes_per_image'])})",
    ]
    for r, value in result["cross_kv_bytes_per_image_kept"].items():
        lines.append(f"  kept fraction r={r} ({first} cross layers trimmed): {value:,} B ({scaled(value)})")
    name, size = unit_for(row["self"] + row["cross_full"] for row in result["vs_batch"])

    def amount(value: float) -> str:  # in the unit of the table being built (size, reassigned per table)
        return f"{value / size:.4g}"

    header = ["batch", "self", "cross full", *[f"cross r={r}" for r in keep], "total full"]
    header += [f"total r={r}" for r in keep]
    rows = []
    for row in result["vs_batch"]:
        cells = [row["batch"], amount(row["self"]), amount(row["cross_full"]), *[amount(row["cross"][r]) for r in keep]]
        cells += [amount(row["self"] + row["cross_full"]), *[amount(row["self"] + row["cross"][r]) for r in keep]]
        rows.append(cells)
    text_tokens = result["vs_batch"][0]["text_tokens"]
    lines += ["", f"(a) KV cache vs batch size, {name}, {text_tokens} text tokens, {result['images']} image(s)"]
    lines.append(table(header, rows))
    name, size = unit_for(max(row["self"], row["cross_full"]) for row in result["vs_text"])
    header = ["text tokens", "self", "cross full", *[f"cross r={r}" for r in keep], "self-attn KV > cross-attn KV for"]
    rows = []
    for row in result["vs_text"]:
        over = [r for r in ["full", *keep] if row["self"] > (row["cross_full"] if r == "full" else row["cross"][r])]
        cells = [row["text_tokens"], amount(row["self"]), amount(row["cross_full"])]
        cells += [amount(row["cross"][r]) for r in keep]
        rows.append([*cells, ", ".join(("r=" + r if r != "full" else r) for r in over) or "-"])
    lines += ["", f"(b) KV cache vs text length, {name}, batch 1, {result['images']} image(s)", table(header, rows)]
    lines.append(
        "self-attention KV overtakes cross-attention KV at: "
        + ", ".join(
            f"{n:,.0f} text tokens ({'full' if r == 'full' else 'r=' + r})"
            for r, n in result["crossover_text_tokens"].items()
        )
    )
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = list(result["cross_kv_bytes_per_image_kept"])
    name = result["model"] or "model"
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    batch = [row["batch"] for row in result["vs_batch"]]
    name_b, size_b = unit_for(row["self"] + row["cross_full"] for row in result["vs_batch"])
    ax_b.plot(batch, [r["self"] / size_b for r in result["vs_batch"]], "k-o", label="self-attn KV")
    ax_b.plot(batch, [r["cross_full"] / size_b for r in result["vs_batch"]], "C0-o", label="cross-attn KV, full")
    for i, r in enumerate(keep):
        ys = [row["cross"][r] / size_b for row in result["vs_batch"]]
        ax_b.plot(batch, ys, f"C{i + 1}--o", label=f"cross-attn KV, r={r}")
    ax_b.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel=name_b,
        title=f"(a) KV vs batch ({result['vs_batch'][0]['text_tokens']} text tokens)",
    )
    ax_b.set_xticks(batch, [str(b) for b in batch])
    lengths = [row["text_tokens"] for row in result["vs_text"]]
    name_t, size_t = unit_for(max(row["self"], row["cross_full"]) for row in result["vs_text"])
    ax_t.plot(lengths, [r["self"] / size_t for r in result["vs_text"]], "k-o", label="self-attn KV")
    ax_t.axhline(result["vs_text"][0]["cross_full"] / size_t, color="C0", label="cross-attn KV, full")
    for i, r in enumerate(keep):
        kept = result["vs_text"][0]["cross"][r] / size_t
        ax_t.axhline(kept, color=f"C{i + 1}", ls="--", label=f"cross-attn KV, r={r}")
    for i, n in enumerate(result["crossover_text_tokens"].values()):
        ax_t.axvline(n, color=f"C{i}", ls=":", lw=1)
        ax_t.text(n, 0.02, f" {n:,.0f}", transform=ax_t.get_xaxis_transform(), rotation=90, fontsize=7, color=f"C{i}")
    ax_t.set(xscale="log", yscale="log", xlabel="text tokens", ylabel=name_t, title="(b) KV vs text length (batch 1)")
    ax_t.set_xticks(lengths, [str(n) for n in lengths])
    ax_b.legend(fontsize=7)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"{name} {result['dtype']}: KV cache per {result['images']} image(s); dotted = crossover", fontsize=10)
    fig.tight_layout()
    path = out / f"kv-{name}-{result['dtype']}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def run(args: argparse.Namespace) -> int:
    if args.dtype.lower() == "auto":
        args.dtype = "bf16"  # what the other commands load on a GPU
    try:
        memory.element_size(args.dtype)
    except ValueError as err:
        raise UserError(str(err)) from err
    args.keep_values = fractions(args.keep)
    args.batch_values = ints(args.batch, "--batch")
    args.length_values = ints(args.lengths, "--lengths")
    if args.text_tokens < 0 or args.images < 1:
        raise UserError("--text-tokens must be >= 0 and --images >= 1")
    model = load_model(args.model, args.preset)
    result = compute(model, args)
    print(render(result))
    if not args.no_plot:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create output folder {str(out)!r}: {err}") from err
        paths = plot(result, out)
        json_path = out / f"kv-{result['model'] or 'model'}-{result['dtype']}.json"
        json_path.write_text(json.dumps(result, indent=1))
        print("wrote " + ", ".join(str(p) for p in [*paths, json_path]))
    return 0
