"""Does a calibrated recommendation hold on questions it did not see? (testbed)

For each ``crosstrim calibrate`` output (calibration.json[.gz], unlabelled agreement on one split) and
each target, recommend a setting with the calibrate rule, then look it up in a ``crosstrim eval``
results.json[.gz] on *another* split (labelled) with the same sweep: its accuracy, the paired
difference from the full model with a 95% interval, and whether the drop stays within 1 - target.

    python benchmarks/calibration_holdout.py VALIDATION/results.json.gz CAL1/calibration.json.gz CAL2/...
"""

from __future__ import annotations

import argparse
import gzip
import json
import math

from crosstrim.evaluation import calibration

TARGETS = (0.9, 0.95, 0.98)


def load(path: str) -> dict:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as handle:
        return json.load(handle)


def recommended(record: dict, target: float) -> calibration.SettingResult | None:
    """The calibrate rule applied to a saved run at another target (the lower bound does not depend on it)."""
    fields = calibration.SettingResult.__dataclass_fields__
    results = [
        calibration.SettingResult(**{**{k: s[k] for k in fields}, "meets_target": s["agreement_low"] >= target})
        for s in record["settings"]
    ]
    return calibration.recommend(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("validation", help="crosstrim eval results.json[.gz] on another split, same sweep")
    parser.add_argument("calibrations", nargs="+", help="crosstrim calibrate calibration.json[.gz] files")
    args = parser.parse_args()
    runs = {r["label"]: r for r in load(args.validation)["runs"]}
    full = [p["correct"] for p in runs["full"]["predictions"]]
    print(f"validation: {load(args.validation)['setup']['data']}, full model {sum(full) / len(full):.1%}\n")
    print(
        "| calibration set | target | recommended | kept | agreement [95% CI] | validation accuracy "
        "| - full (points) | within target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.calibrations:
        record = load(path)
        for target in TARGETS:
            pick = recommended(record, target)
            name = f"{record['setup']['data']} (n={record['setup']['items']})"
            if pick is None:
                print(f"| {name} | {target:.2f} | none | | | | | |")
                continue
            mine = [p["correct"] for p in runs[pick.label]["predictions"]]
            d = [int(a) - int(b) for a, b in zip(mine, full)]
            mean = sum(d) / len(d)
            half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
            within = "yes" if -mean <= 1 - target else "NO"
            drop = f"{mean * 100:+.1f} [{(mean - half) * 100:+.1f}, {(mean + half) * 100:+.1f}]" if any(d) else "same"
            print(
                f"| {name} | {target:.2f} | {pick.label} | {pick.kept_fraction:.1%} | {pick.agreement:.1%} "
                f"[{pick.agreement_low:.1%}, {pick.agreement_high:.1%}] | {sum(mine) / len(mine):.1%} "
                f"| {drop} | {within} |"
            )


if __name__ == "__main__":
    main()
