"""``crosstrim testbed``: train the testbed model from scratch, or export its held-out questions as a file.

The testbed itself (data, model, training recipe, shipped checkpoint) is the package :mod:`crosstrim.testbed`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crosstrim.cli.options import progress_bar
from crosstrim.evaluation import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("testbed", help="train the testbed model or export its questions")
    commands = parser.add_subparsers(dest="testbed_command", required=True)

    train = commands.add_parser("train", help="train the testbed model from scratch (CPU, about an hour)")
    train.add_argument("--out", default="runs/testbed-checkpoint", metavar="DIR", help="where to save the checkpoint")
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped recipe's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the shipped run)")
    train.set_defaults(run=run_train)

    export = commands.add_parser("data", help="write held-out questions as a .jsonl file + PNG images")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--count", type=int, default=300)
    export.add_argument(
        "--seed",
        type=int,
        default=None,
        help="draw items from this split seed instead of the held-out split's (fresh unseen items, e.g. for calibrate)",
    )
    export.set_defaults(run=run_data)


def run_train(args: argparse.Namespace) -> int:
    from crosstrim.testbed import train

    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be at least 1")
    overrides = {"seed": args.seed} | ({"steps": args.steps} if args.steps is not None else {})
    recipe = train.Recipe(**overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"
    with log_path.open("w") as log_file, progress_bar() as bar:
        task = bar.add_task("training", total=recipe.steps, note="")

        def progress(step: int, metrics: dict) -> None:
            bar.update(task, completed=step, note=f"loss {metrics['loss']:.3f} aux {metrics['aux']:.3f}")

        def log(record: dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            accuracy = " ".join(f"{k} {v:.1%}" for k, v in record["valid"].items())
            bar.console.print(f"step {record['step']} ({record['seconds']:.0f} s): validation {accuracy}")

        started = time.perf_counter()
        final = train.train(recipe, out, progress=progress, log=log)
    print(f"trained in {time.perf_counter() - started:.0f} s; validation accuracy {final['valid']}")
    print(f"checkpoint: {out} (log: {log_path})")
    return 0


def run_data(args: argparse.Namespace) -> int:
    from crosstrim.testbed import data, train

    if args.count < 1:
        raise UserError("--count must be at least 1")
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "heldout.jsonl"
    with path.open("w") as handle:
        seed = data.HELDOUT_SEED if args.seed is None else args.seed
        if seed in (data.TRAIN_SEED, train.VALID_SEED):
            raise UserError(f"--seed {seed} is a training or validation split's seed; choose another")
        for item in (data.make_item(seed, i) for i in range(args.count)):
            image = f"images/{item.id}.png"
            item.images[0].save(out / image)
            record = {"id": item.id, "images": [image], "prompt": item.prompt, "answer": item.answer}
            handle.write(json.dumps({**record, "category": item.category, "extra": item.extra}) + "\n")
    print(f"wrote {args.count} held-out questions (split seed {seed}) to {path}")
    return 0
