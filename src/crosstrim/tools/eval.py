"""``crosstrim eval``: accuracy against kept image features for every selection method (the paper's Fig. 5).

One dataset is answered by the untrimmed model and by each selection rule at several budgets; the
result is a table (accuracy per category, kept fraction, cross-attention KV cache), a JSON file with
the configuration, library versions and every prediction, and a plot of accuracy against the
fraction of image tokens kept. For a benchmark with official metrics (a VLMEvalKit TSV) every run is
also scored by them, and the plot shows the headline one. Greedy decoding in a fixed order makes
every number reproducible.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import crosstrim
from crosstrim.config import TrimConfig
from crosstrim.evaluation import UserError, distributed, options, sources
from crosstrim.evaluation.inference import Prediction
from crosstrim.evaluation.options import progress_bar
from crosstrim.testbed import data as testbed_data
from crosstrim.testbed import load_model

# "Later layers see one token": the budget that keeps a single token per image (1e-4 * N < 1 for
# N <= 10,000 image tokens, i.e. any Llama-3.2-Vision input). It measures how much the model needs
# the later cross-attention layers at all; a testbed where this costs little cannot rank selections.
ONE_TOKEN = 1e-4


@dataclass(frozen=True)
class Run:
    """One evaluated configuration: a label, the method family it belongs to, and its trim config."""

    label: str
    family: str
    config: TrimConfig | None


# The TrimConfig field each sweep flag sets, so a bad value is an error naming the flag.
SWEEP_FLAGS = {"method": "--methods", "k_ratio": "--k-ratios", "keep_ratio": "--keep-ratios", "seed": "--seed"}


def plan(
    k_ratios: Sequence[float | str],
    keep_ratios: Sequence[float | str],
    methods: Sequence[str],
    summarize: bool = False,
    seed: int | str = 0,
) -> list[Run]:
    """The runs of one evaluation, untrimmed first; with ``summarize``, every selection also runs with
    ``TrimConfig.summarize_dropped`` (family and label get ``+summary``). Values may be the flags' strings:
    they are parsed by :meth:`TrimConfig.from_options`, whose errors name the flags (``ValueError``)."""

    def config(**options) -> TrimConfig:
        return TrimConfig.from_options({**options, "seed": seed}, names=SWEEP_FLAGS)

    selections = []
    for k in k_ratios:
        trimmed = config(k_ratio=k)
        selections.append(Run(f"trimmed k={trimmed.k_ratio:g}", "trimmed (k_ratio)", trimmed))
    for keep in keep_ratios:
        for name in methods:
            chosen = config(method=name, keep_ratio=keep)
            selections.append(
                Run(f"{chosen.method} keep={chosen.keep_ratio:g}", f"{chosen.method} (keep_ratio)", chosen)
            )
    runs = [Run("full", "full", None)]
    for r in selections:
        runs.append(r)
        if summarize:
            runs.append(Run(f"{r.label} +summary", f"{r.family} +summary", replace(r.config, summarize_dropped=True)))
    runs.append(Run("later layers: 1 token", "one token", config(method="uniform", keep_ratio=ONE_TOKEN)))
    return runs


def summarise(run: Run, data: sources.Dataset, predictions: list[Prediction]) -> dict:
    """Accuracy overall and per category, the official metrics (``None`` where the dataset has none),
    kept fraction and KV bytes, and the per-item records."""
    records, by_category = [], {}
    for item, pred in zip(data.items, predictions):
        correct = data.score(item, pred.text)
        by_category.setdefault(item.category, []).append((correct, pred.kept_fraction))
        records.append(
            {
                "id": item.id,
                "category": item.category,
                "prediction": pred.text,
                "answer": item.answer,
                "correct": correct,
                "kept": pred.kept,
                "valid": pred.valid,
            }
        )
    fractions = [p.kept_fraction for p in predictions if p.kept_fraction is not None]
    kv_full = [p.kv_bytes_full for p in predictions if p.kv_bytes_full is not None]
    kv_kept = [p.kv_bytes_kept for p in predictions if p.kv_bytes_kept is not None]
    return {
        "label": run.label,
        "family": run.family,
        "config": asdict(run.config) if run.config is not None else None,
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "official": data.official(data.items, [p.text for p in predictions]) if data.official else None,
        "per_category": {
            cat: {
                "accuracy": sum(c for c, _ in rows) / len(rows),
                "kept_fraction": statistics.fmean(f for _, f in rows) if rows[0][1] is not None else 1.0,
                "items": len(rows),
            }
            for cat, rows in by_category.items()
        },
        "kept_fraction": statistics.fmean(fractions) if fractions else 1.0,
        "kept_fraction_std": statistics.pstdev(fractions) if fractions else 0.0,
        "kv_bytes_full": statistics.fmean(kv_full) if kv_full else None,
        "kv_bytes_kept": statistics.fmean(kv_kept) if kv_kept else None,
        "predictions": records,
    }


def official_columns(results: list[dict]) -> list[str]:
    """The overall official metrics of the runs (no per-category ones), headline first; none without."""
    return [key for key in results[0]["official"] or {} if "/" not in key]


def table(results: list[dict]) -> str:
    """A Markdown table: one row per run, kept fraction, KV cache per sample, the overall official
    metrics (where the dataset has them), accuracy overall and per category."""
    categories = list(results[0]["per_category"])
    official = official_columns(results)
    full_kv = next((r["kv_bytes_full"] for r in results if r["kv_bytes_full"]), None)
    head = ["run", "kept (mean ± sd)", "cross-attn KV / sample", *official, "accuracy", *categories]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        kv = r["kv_bytes_kept"] if r["kv_bytes_kept"] is not None else full_kv
        kv_text = f"{kv / 1024:.1f} KiB" if kv is not None else "n/a"
        kept = f"{r['kept_fraction']:.1%} ± {r['kept_fraction_std']:.1%}"
        cells = [r["label"], kept, kv_text, *(f"{r['official'][key]:.2f}" for key in official), f"{r['accuracy']:.1%}"]
        cells += [f"{r['per_category'][c]['accuracy']:.1%}" for c in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_by_category(results: list[dict]) -> str:
    """Kept fraction per category under the adaptive rule: the budget it chooses per question family."""
    adaptive = [r for r in results if r["family"] == "trimmed (k_ratio)"]
    if not adaptive:
        return ""
    categories = list(adaptive[0]["per_category"])
    lines = ["| run | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 1)]
    for r in adaptive:
        cells = [f"{r['per_category'][c]['kept_fraction']:.1%}" for c in categories]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str, headline: str | None = None) -> None:
    """Accuracy against mean kept fraction, one line per method family, one panel per category; with
    ``headline`` (an official metric), that metric of every run in a single panel instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(results[0]["per_category"])
    panels = ["all"] + (categories if 1 < len(categories) <= 4 and headline is None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    families = [f for f in dict.fromkeys(r["family"] for r in results) if f not in ("full", "one token")]
    for ax, panel in zip(axes[0], panels):

        def acc(r, panel=panel):
            if headline is not None:
                return r["official"][headline]
            return r["accuracy"] if panel == "all" else r["per_category"][panel]["accuracy"]

        def kept(r, panel=panel):
            return r["kept_fraction"] if panel == "all" else r["per_category"][panel]["kept_fraction"]

        bases = list(dict.fromkeys(f.removesuffix(" +summary") for f in families))
        for family in families:
            rows = sorted((r for r in results if r["family"] == family), key=kept)
            summary = family.endswith(" +summary")  # drawn dashed, in its selection's colour
            style = {
                "color": f"C{bases.index(family.removesuffix(' +summary'))}",
                "linestyle": "--" if summary else "-",
            }
            ax.plot([kept(r) for r in rows], [acc(r) for r in rows], marker="o", label=family, **style)
        for r in results:
            if r["family"] == "full":
                ax.axhline(acc(r), color="black", linestyle="--", linewidth=1, label="full")
            if r["family"] == "one token":
                ax.axhline(acc(r), color="grey", linestyle=":", linewidth=1, label="later layers: 1 token")
        ax.set_title(panel)
        ax.set_xlabel("kept fraction of image tokens")
        ax.set_xlim(0, 1.02)
        # Official metrics are percentages or, for MME, points (up to 2000): scaled to the values.
        ax.set_ylim(0, 1.02 if headline is None else 1.05 * max([acc(r) for r in results] + [1.0]))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy" if headline is None else f"{headline} (official metric)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict[str, str]:
    import transformers

    return {
        "crosstrim": crosstrim.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _listed(text: str) -> list[str]:
    """The values of a comma-separated sweep flag (empty ones dropped: ``--k-ratios ""`` sweeps none)."""
    return [value.strip() for value in text.split(",") if value.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="accuracy vs kept image features for every selection method")
    options.add_model_arguments(parser, required=False)
    parser.add_argument(
        "--data", metavar="FILE", help="dataset file (.jsonl, VLMEvalKit .tsv); default: the testbed held-out split"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip --data rows that cannot become items (listed in results.json)"
    )
    parser.add_argument("--limit", type=int, default=600, help="use the first N items (default 600)")
    parser.add_argument("--out", default="runs/eval", metavar="DIR", help="output folder (default runs/eval)")
    parser.add_argument("--k-ratios", default="0.5,0.25,0.15,0.1,0.05", help="trimmed k_ratio sweep")
    parser.add_argument("--keep-ratios", default="0.75,0.5,0.25,0.1", help="exact-budget sweep for every method")
    parser.add_argument(
        "--methods", default="trimmed,mean,random,uniform", help="methods of the exact-budget sweep (comma-separated)"
    )
    parser.add_argument(
        "--summarize-dropped",
        action="store_true",
        help="also run every selection with TrimConfig.summarize_dropped (not in the paper)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", default=0, help="seed of the random baseline")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.limit < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--limit, --batch-size and --max-new-tokens must be at least 1")
    try:
        runs = plan(
            _listed(args.k_ratios), _listed(args.keep_ratios), _listed(args.methods), args.summarize_dropped, args.seed
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    if args.data:
        data = sources.load(args.data, skip_bad=args.skip_bad)
        data = replace(data, items=data.items[: args.limit])
        data_name = args.data
    elif args.skip_bad:
        raise UserError("--skip-bad skips bad rows of a --data file; the testbed has none")
    else:
        data = sources.Dataset(testbed_data.heldout(args.limit), sources.exact_match)
        data_name = f"testbed held-out split (seed {testbed_data.HELDOUT_SEED}, first {args.limit})"
    items = data.items
    # Under torchrun every process answers its shard of whole batches (the batches one process would
    # form), so the merged predictions, and the scores, equal a single-process run's.
    with distributed.process_group(args.device) as rank:
        if data.skipped and rank.is_main:
            print(
                f"crosstrim eval: skipped {len(data.skipped)} bad row{'s' if len(data.skipped) > 1 else ''} "
                f"(first: {data.skipped[0]}); all are listed in results.json",
                file=sys.stderr,
            )
        if rank.world_size > 1:
            args.device = str(rank.device)
        model, processor, model_name = load_model(args.model, args.device, args.dtype)
        results = []
        with progress_bar() as bar:
            task = bar.add_task("eval", total=len(items) * len(runs), note="", visible=rank.is_main)
            for r in runs:
                bar.update(task, description=f"{r.label:<24}")
                predictions = distributed.predict_sharded(
                    model,
                    processor,
                    items,
                    r.config,
                    rank=rank.rank,
                    world_size=rank.world_size,
                    batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens,
                    progress=lambda n: bar.advance(task, n),
                )
                if predictions is not None:
                    results.append(summarise(r, data, predictions))
        if not rank.is_main:
            return 0
        processes = rank.world_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model_name} on {data_name}, {len(items)} items"
    report = f"{title}\n\n"
    if data.skipped:
        report += f"Skipped {len(data.skipped)} bad rows of the file (listed in results.json).\n\n"
    if data.official is not None:
        report += (
            f"Official metrics: {', '.join(official_columns(results))} (headline: {data.headline}; per category in "
            "results.json). accuracy and the category columns are per question.\n\n"
        )
    report += f"{table(results)}\n"
    adaptive = kept_by_category(results)
    if adaptive:
        report += f"\nKept fraction per category (trimmed, k_ratio):\n\n{adaptive}\n"
    (out / "results.md").write_text(report)
    setup = {
        "model": model_name,
        "data": data_name,
        "items": len(items),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "decoding": "greedy",
        "processes": processes,
        "headline": data.headline,
    }
    skipped = [asdict(s) for s in data.skipped]
    record = {"setup": setup, "versions": versions(), "skipped": skipped, "runs": results}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    plot(results, out / "accuracy_vs_kept.png", title, data.headline)
    print(report)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_kept.png'}")
    return 0
