"""The lmms-eval adapter: registration, model args, batched generate_until, and end-to-end runs of a local
task (1 process, and 2 CPU processes over gloo) whose scores equal crosstrim's own predict + metrics."""

import glob
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crosstrim import TrimConfig, tiny
from crosstrim.tools import checkpoint, vlmeval
from crosstrim.tools.inference import encode, predict

pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance

from crosstrim.integrations import lmms_eval as adapter

TASK = "crosstrim_pope_fixture"
MODEL_ARGS = "method=trimmed,k_ratio=0.25,batch_size=2,device=cpu"


def pope_rows(count: int = 8):
    rng = np.random.default_rng(7)
    return [
        {"index": i, "image": Image.fromarray(rng.integers(0, 255, (32, 32 * (1 + i % 3), 3), dtype=np.uint8)),
         "question": "is there a red circle in the image ?", "answer": ["Yes", "No"][i % 2],
         "category": ["adversarial", "random"][i // 4]}
        for i in range(count)
    ]  # fmt: skip


def yes_no_model(items):
    """A tiny random model that answers every question "yes" or "no", depending on the image.

    Its head scores only the direction in which the items' final hidden states differ most, with
    opposite signs for "yes" and "no", so the answer splits the items and POPE's metrics move.
    """
    model, processor = tiny.random_model(seed=0)
    with torch.no_grad():
        hidden = model(**encode(processor, items, "cpu"), output_hidden_states=True).hidden_states[-1][:, -1]
        mean = hidden.mean(0)
        direction = torch.linalg.svd(hidden - mean).Vh[0]
        direction -= (direction @ mean) / (mean @ mean) * mean  # no offset: the sign splits the items
        direction *= 50 / (hidden - mean).matmul(direction).std()
        vocab = processor.tokenizer.get_vocab()
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[vocab["yes"]] = direction
        model.lm_head.weight[vocab["no"]] = -direction
    return model, processor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    items = vlmeval.load_tsv(vlmeval.write_tsv(root / "POPE.tsv", pope_rows())).items
    model, processor = yes_no_model(items)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    adapter.write_task(items, root / "task", TASK, max_new_tokens=1)
    return root, items


def reference(root, items, shards: int):
    """crosstrim's own answers, batched as each lmms-eval process batches its documents (rank::shards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = checkpoint.load(root / "model", "cpu")
        answers = {}
        for rank in range(shards):
            part = items[rank::shards]
            answers |= {
                p.id: p
                for p in predict(model, processor, part, TrimConfig(k_ratio=0.25), batch_size=2, max_new_tokens=1)
            }
    finally:
        torch.set_num_threads(threads)
    return [answers[item.id] for item in items]


def run_in_process(root, out):
    """One process: lmms-eval's python entry (``simple_evaluate``), indexing only the local task."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        output = simple_evaluate(
            model="llama_vision_trimmed",
            model_args=f"pretrained={root / 'model'},{MODEL_ARGS},stats_path={out / 'stats.jsonl'}",
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(root / "task"), include_defaults=False),
            log_samples=True,
        )
    finally:
        torch.set_num_threads(threads)
    return output["results"][TASK], sorted(output["samples"][TASK], key=lambda s: s["doc_id"])


def run_lmms_eval(root, out, processes: int):
    """``processes`` CPU processes through lmms-eval's CLI under torchrun (gloo), as a user launches it."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "lmms_eval", "--model", "llama_vision_trimmed"]
    command += ["--model_args", f"pretrained={root / 'model'},{MODEL_ARGS},stats_path={out / 'stats.jsonl'}"]
    command += ["--tasks", TASK, "--include_path", str(root / "task"), "--output_path", str(out), "--log_samples"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "hf-datasets"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=out)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (results,) = glob.glob(str(out / "*" / "*_results.json"))
    (samples,) = glob.glob(str(out / "*" / f"*_samples_{TASK}.jsonl"))
    with open(samples) as handle:
        lines = [json.loads(line) for line in handle]
    with open(results) as handle:
        return json.load(handle)["results"][TASK], sorted(lines, key=lambda s: s["doc_id"])


@pytest.mark.parametrize("processes", [1, 2])
def test_lmms_eval_scores_equal_crosstrim_predict_and_metrics(setup, tmp_path, processes):
    root, items = setup
    expected = reference(root, items, processes)
    texts = [p.text for p in expected]
    assert set(texts) == {"yes", "no"}  # the fixture model's answers depend on the image
    metrics = vlmeval.score(items, texts)
    assert 0 < metrics["f1"] < 100 and 0 < metrics["acc"] < 100

    results, samples = run_in_process(root, tmp_path) if processes == 1 else run_lmms_eval(root, tmp_path, processes)
    assert [
        s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples
    ] == texts
    for metric, value in metrics.items():
        if "/" not in metric:
            assert results[f"{metric},none"] == pytest.approx(value, abs=1e-9), metric
    for sample, prediction in zip(samples, expected):
        (counts,) = sample["token_counts"]
        assert counts["crosstrim_method"] == "trimmed k=0.25"
        assert (counts["crosstrim_kept"], counts["crosstrim_valid"]) == (prediction.kept, prediction.valid)
        assert counts["crosstrim_kv_bytes_kept"] == prediction.kv_bytes_kept < prediction.kv_bytes_full
    stats = sorted(glob.glob(str(tmp_path / "stats*.jsonl")))
    assert len(stats) == processes  # one file per process, each with its own shard
    records = [json.loads(line) for file in stats for line in Path(file).read_text().splitlines()]
    assert sorted(r["doc_id"] for r in records) == list(range(len(items)))
    assert {r["rank"] for r in records} == set(range(processes))


def instance(context, gen_kwargs, doc_id, task="t"):
    return Instance(
        "generate_until",
        (context, gen_kwargs, lambda doc: doc["images"], doc_id, task, "test"),
        idx=0,
        metadata={"task": task, "doc_id": doc_id, "repeats": 1},
    )


def test_generate_until_batches_cuts_at_stop_strings_and_stays_greedy(setup):
    root, items = setup
    lm = adapter.LlamaVisionTrimmed.create_from_arg_string(
        f"pretrained={root / 'model'},method=full,batch_size=3",
        {"batch_size": 1, "device": "cpu", "max_batch_size": None},
    )
    assert lm.config is None and lm.batch_size == 3 and lm.device == torch.device("cpu")
    lm.task_dict = {"t": {"test": [{"images": list(item.images)} for item in items]}}
    requests = [instance(item.prompt, {"max_new_tokens": 3, "until": ["no"]}, k) for k, item in enumerate(items)]
    requests[0] = instance(items[0].prompt, {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7}, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = lm.generate_until(requests)
    assert {str(w.message) for w in caught} >= {
        "llama_vision_trimmed decodes greedily; ignoring the task's do_sample=True",
        "llama_vision_trimmed decodes greedily; ignoring the task's temperature=0.7",
    }
    full = predict(lm.model, lm.processor, items, None, batch_size=3, max_new_tokens=3)
    assert results[0].text == full[0].text  # sampling requested, greedy given
    assert [r.text for r in results[1:]] == [p.text.split("no", 1)[0] for p in full[1:]]
    assert any("no" in p.text for p in full[1:])  # the stop string did cut something
    assert results[1].token_counts.to_dict() == {"crosstrim_method": "full"}


def test_model_args_errors_and_registration(setup):
    from lmms_eval.models import get_model

    assert get_model("llama_vision_trimmed") is adapter.LlamaVisionTrimmed  # through crosstrim's entry point
    root, _ = setup
    with pytest.raises(TypeError, match="unknown model_args k"):
        adapter.LlamaVisionTrimmed(pretrained=str(root / "model"), k=0.2)
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        adapter.LlamaVisionTrimmed(pretrained=str(root / "model"), batch_size="auto")
    with pytest.raises(ValueError, match="needs keep_ratio"):
        adapter.trim_config("random")
    with pytest.raises(ValueError, match="unknown method 'fastv'"):
        adapter.trim_config("fastv")
    assert adapter.trim_config("trimmed", k_ratio=1) == TrimConfig(k_ratio=1.0)
    dispatched = adapter.LlamaVisionTrimmed(pretrained=str(root / "model"), device_map="auto", dtype="float32")
    assert dispatched.device == torch.device("cpu") and dispatched.config == TrimConfig(k_ratio=0.25)
    with pytest.raises(ValueError, match="write_task takes the items of one VLMEvalKit benchmark"):
        adapter.write_task([items_without_benchmark()], root / "bad", "bad")


def items_without_benchmark():
    from crosstrim.tools.dataset import Item

    return Item("1", (Image.new("RGB", (8, 8)),), "q", "a", "")
