"""Sharding a dataset over processes: shards, merging, and 2 CPU processes (gloo) answering like 1."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from crosstrim import TrimConfig, tiny
from crosstrim.evaluation import checkpoint, distributed, vlmeval_tsv
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import Prediction


@pytest.mark.parametrize(("count", "world", "batch"), [(7, 2, 2), (10, 3, 1), (5, 4, 2), (1, 2, 4), (0, 2, 3)])
def test_shards_are_contiguous_whole_batches_covering_every_item_once(count, world, batch):
    items = list(range(count))
    shards = [distributed.shard(items, rank, world, batch) for rank in range(world)]
    assert [i for part in shards for i in part] == items  # in order, each once
    for part in shards[:-1]:
        assert len(part) % batch == 0  # only the last shard may end in a partial batch
    sizes = [len(part) for part in shards]
    assert max(sizes) - min(sizes) <= batch


def test_shard_and_merge_errors():
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        distributed.shard([1, 2], 2, 2)
    items = [Item(str(i), (), "", "", "") for i in range(3)]
    parts = [[Prediction("0", "a"), Prediction("1", "b")], [Prediction("2", "c")]]
    assert [p.text for p in distributed.merge(items, parts[::-1])] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"1 item\(s\) were not answered, e.g. '2'"):
        distributed.merge(items, parts[:1])
    with pytest.raises(ValueError, match="item '1' was answered twice"):
        distributed.merge(items, [*parts, [Prediction("1", "x")]])
    with pytest.raises(ValueError, match="unknown item"):
        distributed.merge(items[:2], parts)
    assert distributed.gather([Prediction("0", "a")], 0, 1) == [[Prediction("0", "a")]]


WORKER = """
import json, sys
import torch
from crosstrim import TrimConfig
from crosstrim.evaluation import checkpoint, distributed, vlmeval_tsv

torch.set_num_threads(1)
model_dir, data, out = sys.argv[1:4]
items = vlmeval_tsv.load_tsv(data).items
with distributed.process_group(device="cpu") as me:
    assert torch.distributed.is_initialized() == (me.world_size > 1)
    model, processor = checkpoint.load(model_dir, str(me.device))
    predictions = distributed.predict_sharded(
        model, processor, items, TrimConfig(k_ratio=0.25), rank=me.rank, world_size=me.world_size,
        batch_size=2, max_new_tokens=3,
    )
    shard = [p.id for p in distributed.shard(items, me.rank, me.world_size, 2)]
    json.dump(shard, open(f"{out}.shard{me.rank}", "w"))
    if me.is_main:
        json.dump([p.__dict__ for p in predictions], open(out, "w"))
    else:
        assert predictions is None
"""


def run_workers(tmp_path, processes: int, model_dir, data) -> tuple[list[dict], list[list[str]]]:
    """``processes`` workers under torchrun: rank 0's merged predictions and each rank's shard ids."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / f"predictions{processes}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [str(script), str(model_dir), str(data), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [json.loads((tmp_path / f"{out.name}.shard{r}").read_text()) for r in range(processes)]
    return json.loads(out.read_text()), shards


def test_two_cpu_processes_give_the_predictions_of_one(tmp_path):
    model, processor = tiny.random_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    rows = [
        {"index": i, "image": Image.fromarray(rng.integers(0, 255, (32, 32 * (1 + i % 3), 3), dtype=np.uint8)),
         "question": "what color is the circle ?", "answer": "Yes"}
        for i in range(7)
    ]  # fmt: skip
    data = vlmeval_tsv.write_tsv(tmp_path / "items.tsv", rows)
    two, two_shards = run_workers(tmp_path, 2, tmp_path / "model", data)
    assert two_shards == [["0", "1", "2", "3"], ["4", "5", "6"]]  # both processes answered
    # One process: this one, with the workers' settings (one thread, same model files and items).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = checkpoint.load(tmp_path / "model", "cpu")
        single = distributed.predict_sharded(
            model, processor, vlmeval_tsv.load_tsv(data).items, TrimConfig(k_ratio=0.25), batch_size=2, max_new_tokens=3
        )
    finally:
        torch.set_num_threads(threads)
    one = [p.__dict__ for p in single]
    assert [p["id"] for p in two] == [str(i) for i in range(7)]
    assert two == one  # texts and per-item kept / KV bytes
    assert all(p["kept"] < p["valid"] for p in one)


def test_crosstrim_eval_under_torchrun_scores_like_one_process(tmp_path):
    """`crosstrim eval` sharded over 2 gloo processes writes the runs a single process writes, the random
    baseline's included (each sample draws from a seed of its own, not from a generator shared by the
    batches a process answered before)."""
    args = ["eval", "--device", "cpu", "--limit", "12", "--batch-size", "4", "--max-new-tokens", "3"]
    args += ["--k-ratios", "0.25", "--keep-ratios", "0.5", "--methods", "trimmed,mean,random,uniform"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*launcher, "-m", "crosstrim.cli", *args, "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((out / "results.json").read_text())
        assert result["setup"]["processes"] == processes
        runs[processes] = result["runs"]
    assert len(runs[1]) >= 5
    assert runs[1] == runs[2]
