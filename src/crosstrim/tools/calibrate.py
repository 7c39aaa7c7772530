"""``crosstrim calibrate``: pick a trimming ratio for your own requests, no labels needed.

The full model answers every request once; every candidate setting answers the same requests; the
table shows how often each agrees with the full model (with a 95% Wilson interval), how far its first
answer token's distribution moves, what it keeps and what its KV cache holds, and names the setting
that keeps the least while the lower end of its agreement interval still reaches ``--target``
(:mod:`crosstrim.evaluation.calibration` says why the lower end).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crosstrim.cli import options
from crosstrim.cli.options import load_model, progress_bar
from crosstrim.evaluation import UserError, calibration, distributed, run_setup, versions
from crosstrim.testbed import data as testbed_data


def to_json(record: dict) -> str:
    """Indented JSON with one line per request (a request holds every setting's answer)."""
    head = json.dumps({k: v for k, v in record.items() if k != "requests"}, indent=1)
    requests = ",\n".join("  " + json.dumps(r) for r in record["requests"])
    return f'{head[:-2]},\n "requests": [\n{requests}\n ]\n}}\n'


def table(cal: calibration.Calibration) -> str:
    """Markdown: one row per setting, the recommended one marked."""
    head = ["setting", "kept (mean ± sd)", "cross-attn KV / request", "agreement [95% CI]", "first-token TV", "KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full_kv = cal.results[0].kv_bytes_full if cal.results else 0
    lines.append(f"| full | 100.0% | {full_kv / 1024:.1f} KiB | 100% (reference) | 0 | 0 |")
    for r in cal.results:
        mark = " **(recommended)**" if cal.recommended is r else ""
        lines.append(
            f"| {r.label}{mark} | {r.kept_fraction:.1%} ± {r.kept_fraction_std:.1%} | {r.kv_bytes_kept / 1024:.1f} KiB "
            f"| {r.agreement:.1%} [{r.agreement_low:.1%}, {r.agreement_high:.1%}] ({r.agree}/{r.items}) "
            f"| {r.total_variation:.3f} | {r.kl:.3f} |"
        )
    return "\n".join(lines)


def verdict(cal: calibration.Calibration) -> str:
    if cal.recommended is None:
        near = max(cal.results, key=lambda r: r.agreement_low)
        return (
            f"No setting agrees with the full model at >= {cal.target:.0%} with 95% confidence (best lower bound: "
            f"{near.label}, {near.agreement_low:.1%}). Calibrate on more requests (the interval narrows), add "
            "larger ratios, or lower --target."
        )
    r = cal.recommended
    return (
        f"Recommended: {r.label} -- keeps {r.kept_fraction:.1%} of image tokens, cross-attention KV "
        f"{r.kv_bytes_kept / 1024:.1f} of {r.kv_bytes_full / 1024:.1f} KiB per request; agrees with the full model "
        f"on {r.agree}/{r.items} requests ({r.agreement:.1%}, 95% CI {r.agreement_low:.1%}-{r.agreement_high:.1%}, "
        f"lower bound >= target {cal.target:.0%})."
    )


def plot(cal: calibration.Calibration, path: Path, title: str) -> None:
    """Agreement (with its interval) and first-token TV against kept fraction, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    families = list(dict.fromkeys(r.family for r in cal.results))
    bases = list(dict.fromkeys(f.removesuffix(" +summary") for f in families))
    for family in families:
        rows = sorted((r for r in cal.results if r.family == family), key=lambda r: r.kept_fraction)
        style = {
            "color": f"C{bases.index(family.removesuffix(' +summary'))}",
            "linestyle": "--" if family.endswith(" +summary") else "-",
            "marker": "o",
            "label": family,
        }
        kept = [r.kept_fraction for r in rows]
        errors = [[r.agreement - r.agreement_low for r in rows], [r.agreement_high - r.agreement for r in rows]]
        left.errorbar(kept, [r.agreement for r in rows], yerr=errors, capsize=2, **style)
        right.plot(kept, [r.total_variation for r in rows], **style)
    marks = [left.axhline(cal.target, color="black", linestyle=":", linewidth=1, label=f"target {cal.target:.0%}")]
    if cal.recommended is not None:
        r = cal.recommended
        marks += left.plot(
            [r.kept_fraction], [r.agreement], marker="*", markersize=16, color="gold", markeredgecolor="black",
            linestyle="none", label=f"recommended: {r.label}",
        )  # fmt: skip
    left.legend(handles=marks, fontsize=7, loc="lower right")
    left.set_ylabel("agreement with the full model (95% CI)")
    right.set_ylabel("first answer token: mean total variation")
    for ax in (left, right):
        ax.set_xlabel("kept fraction of image tokens")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
    left.set_ylim(0, 1.02)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Testbed questions calibrated on without --limit (a --data file is used whole).
TESTBED_REQUESTS = 300


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="choose a trimming ratio from unlabelled requests (agreement with the full model)"
    )
    options.add_model_arguments(parser)
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="requests: .jsonl (images, prompt per line), VLMEvalKit .tsv, or a folder of images with --prompt; "
        "default: the testbed held-out split",
    )
    parser.add_argument("--prompt", help="the question asked of every image of a --data folder")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad rows of a .tsv file")
    parser.add_argument("--target", type=float, default=0.95, help="agreement to reach (default 0.95)")
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"use only the first N requests (default: all of --data; {TESTBED_REQUESTS} testbed questions)",
    )
    parser.add_argument("--out", default="runs/calibrate", metavar="DIR", help="output folder (default runs/calibrate)")
    options.add_sweep_arguments(parser, methods="trimmed", what="try")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answers are compared over this many tokens")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--limit, --batch-size and --max-new-tokens must be at least 1")
    if not 0 < args.target <= 1:
        raise UserError(f"--target is an agreement in (0, 1], e.g. 0.95; got {args.target}")
    settings = options.sweep_settings(args)
    if not settings:
        raise UserError("nothing to calibrate: give --k-ratios and/or --keep-ratios")
    if args.data:
        requests = calibration.load_requests(args.data, args.prompt, skip_bad=args.skip_bad)
        items = requests[: args.limit]  # a user's file is answered whole unless they limit it, and then it says so
        data_name = args.data if len(items) == len(requests) else f"{args.data} (first {len(items)} of {len(requests)})"
    else:
        if args.prompt:
            raise UserError("--prompt asks one question of a --data folder of images")
        count = args.limit or TESTBED_REQUESTS
        items = testbed_data.heldout(count)
        data_name = f"testbed held-out split (seed {testbed_data.HELDOUT_SEED}, first {count})"
    with distributed.process_group(args.device) as rank:
        if rank.world_size > 1:
            args.device = str(rank.device)
        model, processor, model_name = load_model(args.model, args.device, args.dtype)
        with progress_bar() as bar:
            task = bar.add_task("calibrate", total=len(items) * (len(settings) + 1), note="", visible=rank.is_main)
            cal = calibration.calibrate(
                model,
                processor,
                items,
                settings,
                target=args.target,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                rank=rank.rank,
                world_size=rank.world_size,
                progress=lambda n: bar.advance(task, n),
            )
        if cal is None:
            return 0
        processes = rank.world_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model_name} on {data_name}, {len(items)} requests, target {args.target:.0%}"
    report = f"{title}\n\n{table(cal)}\n\n{verdict(cal)}\n"
    (out / "calibration.md").write_text(report)
    setup = run_setup(model, model_name, data_name, len(items), args.batch_size, args.max_new_tokens, processes)
    record = {"setup": setup, "versions": versions(), **cal.to_json()}
    (out / "calibration.json").write_text(to_json(record))
    plot(cal, out / "calibration.png", title)
    print(report)
    print(f"wrote {out / 'calibration.md'}, {out / 'calibration.json'}, {out / 'calibration.png'}")
    return 0
