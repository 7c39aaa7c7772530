"""What the testbed's accuracy figures can carry: 95% intervals, per tile count, and what trimming drops.

Reads a ``crosstrim eval`` results.json on testbed items (their ids name the split seed and index, so
each item's scene is regenerated) and prints Markdown tables:

* accuracy overall, per family and per tile count, each with its Wilson 95% interval;
* paired differences between runs (the same items answered twice), with a 95% interval from the
  per-item differences (normal approximation);
* ``--coverage``: for trimmed selections, per tile count, how often every object's token is kept, the
  kept share, and the summarised runs' accuracy split by whether every object was kept (this answers
  why the summary token helps little on 1-tile images).

    OMP_NUM_THREADS=1 python benchmarks/fidelity.py runs/eval/results.json --coverage
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from collections import defaultdict

import torch

from crosstrim.core import TrimConfig
from crosstrim.evaluation import checkpoint
from crosstrim.evaluation.calibration import wilson_interval
from crosstrim.evaluation.inference import encode
from crosstrim.testbed import CHECKPOINT, data

RUNS = [
    "full",
    "trimmed k=0.25",
    "trimmed k=0.25 +summary",
    "trimmed keep=0.25",
    "trimmed keep=0.25 +summary",
    "random keep=0.25",
    "uniform keep=0.25",
    "trimmed k=0.1 +summary",
    "later layers: 1 token",
]
PAIRS = [
    ("trimmed k=0.25", "full"),
    ("trimmed k=0.25 +summary", "full"),
    ("trimmed keep=0.25", "random keep=0.25"),
    ("trimmed keep=0.25", "uniform keep=0.25"),
    ("trimmed keep=0.25 +summary", "random keep=0.25"),
    ("trimmed k=0.1 +summary", "full"),
]


def item_of(item_id: str):
    _, seed, index = item_id.rsplit("-", 2)
    return data.make_item(int(seed), int(index))


def cell(rows: list[bool]) -> str:
    k, n = sum(rows), len(rows)
    low, high = wilson_interval(k, n)
    return f"{k / n:.1%} [{low:.1%}, {high:.1%}] n={n}"


def paired(a: list[bool], b: list[bool]) -> str:
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    if not any(d):
        return f"same on all {n} items"
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return f"{mean * 100:+.1f} [{(mean - half) * 100:+.1f}, {(mean + half) * 100:+.1f}] points"


def tiles_of(item) -> int:
    rows, cols = item.extra["layout"]
    return rows * cols


def accuracy_tables(runs: dict[str, dict], items: dict) -> None:
    names = [r for r in RUNS if r in runs]
    families = list(dict.fromkeys(p["category"] for p in runs["full"]["predictions"]))
    print("| run | overall | " + " | ".join(families) + " |")
    print("|---|---|" + "---|" * len(families))
    for name in names:
        preds = runs[name]["predictions"]
        cells = [cell([p["correct"] for p in preds])]
        cells += [cell([p["correct"] for p in preds if p["category"] == f]) for f in families]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nPer tile count (real tiles of the image):\n")
    counts = sorted({tiles_of(items[p["id"]]) for p in runs["full"]["predictions"]})
    print("| run | " + " | ".join(f"{t} tile{'s' * (t > 1)}" for t in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in names:
        preds = runs[name]["predictions"]
        by = defaultdict(list)
        for p in preds:
            by[tiles_of(items[p["id"]])].append(p["correct"])
        print(f"| {name} | " + " | ".join(cell(by[t]) for t in counts) + " |")
    print("\nGlobal questions per tile count:\n")
    print("| run | " + " | ".join(f"{t}" for t in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in names:
        by = defaultdict(list)
        for p in runs[name]["predictions"]:
            if p["category"] == "global":
                by[tiles_of(items[p["id"]])].append(p["correct"])
        print(f"| {name} | " + " | ".join(cell(by[t]) for t in counts) + " |")
    print("\nPaired differences (same items; 95% interval of the mean per-item difference):\n")
    print("| runs | overall | " + " | ".join(families) + " |")
    print("|---|---|" + "---|" * len(families))
    for a, b in PAIRS:
        if a not in runs or b not in runs:
            continue
        pa, pb = runs[a]["predictions"], runs[b]["predictions"]
        cells = [paired([p["correct"] for p in pa], [p["correct"] for p in pb])]
        for f in families:
            cells.append(
                paired(
                    [p["correct"] for p in pa if p["category"] == f], [q["correct"] for q in pb if q["category"] == f]
                )
            )
        print(f"| {a} - {b} | " + " | ".join(cells) + " |")


def object_tokens(item) -> set[int]:
    """Image-token positions of the objects (tile-major, CLS first in each tile, patches row-major)."""
    _, cols = item.extra["layout"]
    per_tile = data.TILE_CELLS**2 + 1
    found = set()
    for row, col, _, _ in item.extra["objects"]:
        tile = (row // data.TILE_CELLS) * cols + col // data.TILE_CELLS
        found.add(tile * per_tile + 1 + (row % data.TILE_CELLS) * data.TILE_CELLS + col % data.TILE_CELLS)
    return found


def coverage(runs: dict[str, dict], items: dict, batch_size: int = 32) -> None:
    import crosstrim

    model, processor = checkpoint.load(CHECKPOINT, "cpu")
    ordered = [items[p["id"]] for p in runs["full"]["predictions"]]
    per_tile = data.TILE_CELLS**2 + 1
    for label, config in [
        ("trimmed k=0.25", TrimConfig(k_ratio=0.25)),
        ("trimmed keep=0.25", TrimConfig(keep_ratio=0.25)),
    ]:
        kept_all, share, cls_kept, dropped_n = {}, defaultdict(list), defaultdict(list), defaultdict(list)
        with crosstrim.trimmed(model, config) as handle:
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                with torch.no_grad():
                    model(**encode(processor, batch, "cpu"))
                stats = handle.stats
                for b, item in enumerate(batch):
                    kept = set(stats.kept_indices[b].tolist())
                    t = tiles_of(item)
                    kept_all[item.id] = object_tokens(item) <= kept
                    share[t].append(stats.kept_fraction[b])
                    cls_kept[t].append(sum(i * per_tile in kept for i in range(t)) / t)
                    dropped_n[t].append(stats.valid_counts[b] - stats.kept_counts[b])
        print(f"\n{label}: per tile count\n")
        print(
            "| tiles | kept share | dropped tokens | CLS kept | every object kept "
            "| +summary acc, objects all kept | +summary acc, an object dropped |"
        )
        print("|---|---|---|---|---|---|---|")
        summary = {p["id"]: p["correct"] for p in runs.get(f"{label} +summary", {"predictions": []})["predictions"]}
        for t in sorted(share):
            ids = [i.id for i in ordered if tiles_of(i) == t]
            covered = [kept_all[i] for i in ids]
            yes = [summary[i] for i in ids if kept_all[i] and i in summary]
            no = [summary[i] for i in ids if not kept_all[i] and i in summary]
            print(
                f"| {t} | {sum(share[t]) / len(share[t]):.1%} | {sum(dropped_n[t]) / len(dropped_n[t]):.1f} "
                f"| {sum(cls_kept[t]) / len(cls_kept[t]):.0%} | {cell(covered)} "
                f"| {cell(yes) if yes else 'n/a'} | {cell(no) if no else 'n/a'} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="crosstrim eval results.json (or .json.gz) on testbed items")
    parser.add_argument("--coverage", action="store_true", help="also rerun trimmed selections for object coverage")
    args = parser.parse_args()
    torch.set_num_threads(1)
    opener = gzip.open if args.results.endswith(".gz") else open
    with opener(args.results, "rt") as handle:
        record = json.load(handle)
    runs = {r["label"]: r for r in record["runs"]}
    items = {p["id"]: item_of(p["id"]) for p in runs["full"]["predictions"]}
    print(f"{record['setup']['data']}, {record['setup']['items']} items\n")
    accuracy_tables(runs, items)
    if args.coverage:
        coverage(runs, items)


if __name__ == "__main__":
    main()
