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
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from crosstrim.cli import options
from crosstrim.cli.options import load_model, progress_bar
from crosstrim.core import method_names
from crosstrim.evaluation import UserError, distributed, run_setup, sources, sweep, versions, vlmeval_tsv
from crosstrim.evaluation.inference import Prediction
from crosstrim.evaluation.sweep import Family, Setting
from crosstrim.testbed import data as testbed_data

# "Later layers see one token": the budget that keeps a single token per image (1e-4 * N < 1 for
# N <= 10,000 image tokens, i.e. any Llama-3.2-Vision input). It measures how much the model needs
# the later cross-attention layers at all; a testbed where this costs little cannot rank selections.
ONE_TOKEN = 1e-4
# Why ratio 1.0 saves no cache while 0.999 does, printed under every table.
KV_NOTE = (
    "Kept is over real image tokens; the KV cache counts every slot it holds. The full model and ratio 1 "
    "(the identity) also hold the padding tiles of images with fewer tiles than the maximum; any ratio below 1 "
    "drops them, so k=0.999 saves cache while keeping ~every real token."
)
# Testbed questions answered without --limit (a --data file is answered whole).
TESTBED_ITEMS = 600


def plan(settings: Sequence[Setting], seed: int | str = 0) -> list[Setting]:
    """The runs of one evaluation: untrimmed first, then the sweep's ``settings``, then one token per image
    in the later layers (how much the model needs them at all)."""
    one_token = sweep.sweep_config(seed, method="uniform", keep_ratio=ONE_TOKEN)
    return [
        Setting("full", Family("full"), None),
        *settings,
        Setting("later layers: 1 token", Family("one token"), one_token),
    ]


def summarise(run: Setting, data: sources.Dataset, predictions: list[Prediction]) -> dict:
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
        "family": str(run.family),
        "config": asdict(run.config) if run.config is not None else None,
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "correct": sum(r["correct"] for r in records),
        "items": len(records),
        "interval95": sweep.wilson_interval(sum(r["correct"] for r in records), len(records)),
        "official": data.official(data.items, [p.text for p in predictions]) if data.official else None,
        "per_category": {
            cat: {
                "accuracy": sum(c for c, _ in rows) / len(rows),
                "correct": sum(c for c, _ in rows),
                "interval95": sweep.wilson_interval(sum(c for c, _ in rows), len(rows)),
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


def _accuracy(cell: dict) -> str:
    """An accuracy with the counts it comes from, e.g. ``97.0% (582/600)``."""
    return f"{cell['accuracy']:.1%} ({cell['correct']}/{cell['items']})"


def uncertainty_note(results: list[dict]) -> str:
    """The widest 95% interval of the table's accuracies, so that a 100% on a few items reads as what it is."""
    cells = [cell for r in results for cell in [r, *r["per_category"].values()]]
    widest = max(cells, key=lambda cell: cell["interval95"][1] - cell["interval95"][0])
    low, high = widest["interval95"]
    return (
        f"Accuracy cells: correct/items. 95% intervals are in results.json; the widest here, "
        f"{widest['correct']}/{widest['items']}, spans {low:.1%} to {high:.1%}."
    )


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
        cells = [r["label"], kept, kv_text, *(f"{r['official'][key]:.2f}" for key in official), _accuracy(r)]
        cells += [_accuracy(r["per_category"][c]) for c in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_by_category(results: list[dict]) -> str:
    """Kept fraction per category under the adaptive rule: the budget it chooses per question family."""
    adaptive = [r for r in results if r["config"] and r["config"]["k_ratio"] is not None]
    adaptive = [r for r in adaptive if not r["config"]["summarize_dropped"]]
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


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="accuracy vs kept image features for every selection method")
    options.add_model_arguments(parser)
    parser.add_argument(
        "--data", metavar="FILE", help="dataset file (.jsonl, VLMEvalKit .tsv); default: the testbed held-out split"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip --data rows that cannot become items (listed in results.json)"
    )
    parser.add_argument(
        "--benchmark",
        choices=vlmeval_tsv.BENCHMARKS,
        help="how a .tsv is scored (default: recognised from its file name, else its columns or answers)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"answer only the first N items (default: all of --data; {TESTBED_ITEMS} testbed questions); "
        "an MME image pair or MMVP case is never split",
    )
    parser.add_argument("--out", default="runs/eval", metavar="DIR", help="output folder (default runs/eval)")
    options.add_sweep_arguments(parser, methods=",".join(method_names()), what="run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--limit, --batch-size and --max-new-tokens must be at least 1")
    runs = plan(options.sweep_settings(args), args.seed)
    if args.data:
        data = sources.load(args.data, skip_bad=args.skip_bad, benchmark=args.benchmark)
        total = len(data.items)
        if args.limit is not None:
            data = data.limited(args.limit)
        data_name = args.data
        if data.benchmark is not None:
            how = "--benchmark" if args.benchmark else "recognised from the file; choose with --benchmark"
            data_name += f" (benchmark {data.benchmark}, {how})"
        count = f"{len(data.items):,} of {total:,} items" if len(data.items) < total else f"all {total:,} items"
    elif args.skip_bad or args.benchmark:
        raise UserError("--skip-bad and --benchmark apply to a --data file; the testbed has no bad rows and one scorer")
    else:
        limit = args.limit or TESTBED_ITEMS
        data = sources.Dataset(testbed_data.heldout(limit), sources.exact_match)
        data_name = f"testbed held-out split (seed {testbed_data.HELDOUT_SEED})"
        count = f"the first {limit:,} items"
    items = data.items
    # Under torchrun every process answers an even share of the items; the bar counts all of them.
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
    title = f"{model_name} on {data_name}, {count}"
    report = f"{title}\n\n"
    if data.skipped:
        report += f"Skipped {len(data.skipped)} bad rows of the file (listed in results.json).\n\n"
    if data.official is not None:
        report += (
            f"Official metrics: {', '.join(official_columns(results))} (headline: {data.headline}; per category in "
            "results.json). accuracy and the category columns are per question.\n\n"
        )
    report += f"{table(results)}\n\n{uncertainty_note(results)} {KV_NOTE}\n"
    adaptive = kept_by_category(results)
    if adaptive:
        report += f"\nKept fraction per category (trimmed, k_ratio):\n\n{adaptive}\n"
    (out / "results.md").write_text(report)
    setup = {
        **run_setup(model, model_name, data_name, len(items), args.batch_size, args.max_new_tokens, processes),
        "headline": data.headline,
        "benchmark": data.benchmark,
        "limit": args.limit,
    }
    skipped = [asdict(s) for s in data.skipped]
    record = {"setup": setup, "versions": versions(), "skipped": skipped, "runs": results}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    plot(results, out / "accuracy_vs_kept.png", title, data.headline)
    print(report)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_kept.png'}")
    return 0
