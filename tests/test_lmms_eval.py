"""The lmms-eval adapter: registration, model args, batched generate_until, and end-to-end runs of local
tasks (no Hub). The testbed checkpoint on held-out testbed questions, through lmms-eval in 1 process and in
2 CPU processes (gloo), answers, scores and keeps exactly what `crosstrim eval` does on the same file (full,
trimmed and the random baseline); a VLMEvalKit POPE file gets the official metrics crosstrim computes."""

import contextlib
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

from crosstrim import TrimConfig, cli, testbed, tiny
from crosstrim.evaluation import checkpoint, sources, vlmeval_metrics, vlmeval_tsv
from crosstrim.evaluation.inference import encode, predict

pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance

from crosstrim.integrations import lmms_eval as adapter
from crosstrim.integrations import lmms_eval_tasks as lmms_tasks

TASK = "crosstrim_pope_fixture"
MODEL_ARGS = "method=trimmed,k_ratio=0.25,batch_size=2,device=cpu"

TESTBED_TASK = "crosstrim_testbed_heldout"
# 11 questions: 2 processes get 6 and 5, so lmms-eval pads the short shard with a duplicate request.
TESTBED_ITEMS = 11
# `crosstrim eval` run label -> the same configuration as lmms-eval model_args.
TESTBED_RUNS = {
    "full": "method=full",
    "trimmed k=0.25": "method=trimmed,k_ratio=0.25",
    "random keep=0.5": "method=random,keep_ratio=0.5,seed=3",
}
# crosstrim eval answers in batches of 4, lmms-eval in batches of 3 (of every other question under 2
# processes): the same question is padded and batched differently, and must still get the same answer.
EVAL_BATCH, LMMS_BATCH, NEW_TOKENS = 4, 3, 3


@contextlib.contextmanager
def one_thread():
    """One torch thread, as the subprocesses run (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def response(sample: dict) -> str:
    resps = sample["filtered_resps"]
    return resps[0] if isinstance(resps, list) else resps


def run_in_process(task_dir, task, model_args):
    """One process: lmms-eval's python entry (``simple_evaluate``), indexing only the local task."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    with one_thread():
        output = simple_evaluate(
            model="llama_vision_trimmed",
            model_args=model_args,
            tasks=[task],
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            log_samples=True,
        )
    return output["results"][task], sorted(output["samples"][task], key=lambda s: s["doc_id"])


def run_lmms_eval(task_dir, task, runs: dict[str, str], out, processes: int):
    """``processes`` CPU processes through lmms-eval's CLI under torchrun (gloo), as a user launches it.

    ``runs`` (name -> model_args) go in one ``--config`` file, which lmms-eval runs one after another in
    a single launch. Returns name -> (results, samples sorted by doc_id).
    """
    import yaml

    configs = [
        {"model": "llama_vision_trimmed", "model_args": args, "tasks": task, "include_path": str(task_dir),
         "output_path": str(out / str(number)), "log_samples": True}
        for number, args in enumerate(runs.values())
    ]  # fmt: skip
    (out / "runs.yaml").write_text(yaml.safe_dump(configs))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "lmms_eval", "--config", str(out / "runs.yaml")]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "hf-datasets"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=500, env=env, cwd=out)
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, log
    outputs = {}
    for number, name in enumerate(runs):
        found = glob.glob(str(out / str(number) / "*" / "*_results.json"))
        assert len(found) == 1, f"run {name!r} wrote no results (lmms-eval logs a failed run and goes on): {log}"
        (samples,) = glob.glob(str(out / str(number) / "*" / f"*_samples_{task}.jsonl"))
        lines = [json.loads(line) for line in Path(samples).read_text().splitlines()]
        outputs[name] = (
            json.loads(Path(found[0]).read_text())["results"][task],
            sorted(lines, key=lambda s: s["doc_id"]),
        )
    return outputs


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Held-out testbed questions as `crosstrim testbed data` writes them, `crosstrim eval`'s runs on that
    file (the shipped testbed checkpoint), and the same questions written as a local lmms-eval task."""
    root = tmp_path_factory.mktemp("testbed-lmms")
    assert cli.main(["testbed", "data", "--out", str(root / "data"), "--count", str(TESTBED_ITEMS)]) == 0
    data = root / "data" / "heldout.jsonl"
    args = ["eval", "--data", data, "--device", "cpu", "--batch-size", EVAL_BATCH, "--max-new-tokens", NEW_TOKENS]
    args += ["--k-ratios", "0.25", "--keep-ratios", "0.5", "--methods", "random", "--seed", "3", "--out", root / "eval"]
    with one_thread():
        assert cli.main([str(a) for a in args]) == 0
    runs = {r["label"]: r for r in json.loads((root / "eval" / "results.json").read_text())["runs"]}
    items = sources.load(data).items
    lmms_tasks.write_task(items, root / "task", TESTBED_TASK, max_new_tokens=NEW_TOKENS)
    return root, items, {label: runs[label] for label in TESTBED_RUNS}


@pytest.mark.parametrize("processes", [1, 2])
def test_lmms_eval_on_testbed_questions_equals_crosstrim_eval(heldout, tmp_path, processes):
    root, items, expected = heldout
    model_args = {
        label: f"pretrained={testbed.CHECKPOINT},{args},batch_size={LMMS_BATCH},device=cpu,"
        f"stats_path={tmp_path / f'stats{number}.jsonl'}"
        for number, (label, args) in enumerate(TESTBED_RUNS.items())
    }
    if processes == 1:
        outputs = {label: run_in_process(root / "task", TESTBED_TASK, args) for label, args in model_args.items()}
    else:
        outputs = run_lmms_eval(root / "task", TESTBED_TASK, model_args, tmp_path, processes)
    texts = {}
    for number, (label, run) in enumerate(expected.items()):
        results, samples = outputs[label]
        assert [s["doc_id"] for s in samples] == list(range(len(items)))
        texts[label] = [response(s) for s in samples]
        assert texts[label] == [p["prediction"] for p in run["predictions"]], label
        assert results["accuracy,none"] == pytest.approx(run["accuracy"], abs=1e-12), label
        for category, values in run["per_category"].items():
            assert results[f"{category}/accuracy,none"] == pytest.approx(values["accuracy"], abs=1e-12), label
        for sample, record in zip(samples, run["predictions"]):
            (counts,) = sample["token_counts"]
            if label == "full":
                assert counts == {"crosstrim_method": "full"}
            else:
                assert counts["crosstrim_method"] == label
                assert (counts["crosstrim_kept"], counts["crosstrim_valid"]) == (record["kept"], record["valid"])
                assert record["kept"] < record["valid"]
        stats = sorted(glob.glob(str(tmp_path / f"stats{number}*.jsonl")))
        assert len(stats) == processes  # one file per process, each with its own shard (padding left out)
        records = [json.loads(line) for file in stats for line in Path(file).read_text().splitlines()]
        assert sorted(r["doc_id"] for r in records) == list(range(len(items)))
        assert {r["rank"] for r in records} == set(range(processes))
    # Not vacuous: some run gets some right and some wrong, and trimming changes answers.
    assert any(0 < run["accuracy"] < 1 for run in expected.values())
    assert texts["trimmed k=0.25"] != texts["full"] or texts["random keep=0.5"] != texts["full"]


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
    items = vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(root / "POPE.tsv", pope_rows())).items
    model, processor = yes_no_model(items)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    lmms_tasks.write_task(items, root / "task", TASK, max_new_tokens=1)
    return root, items


def test_lmms_eval_scores_a_vlmevalkit_task_with_its_official_metrics(setup, tmp_path):
    """POPE through lmms-eval (one process): every answer, official metric and kept count is crosstrim's own."""
    root, items = setup
    with one_thread():
        model, processor = checkpoint.load(root / "model", "cpu")
        expected = predict(model, processor, items, TrimConfig(k_ratio=0.25), batch_size=2, max_new_tokens=1)
    texts = [p.text for p in expected]
    assert set(texts) == {"yes", "no"}  # the fixture model's answers depend on the image
    metrics = vlmeval_metrics.score(items, texts)
    assert 0 < metrics["f1"] < 100 and 0 < metrics["acc"] < 100

    model_args = f"pretrained={root / 'model'},{MODEL_ARGS},stats_path={tmp_path / 'stats.jsonl'}"
    results, samples = run_in_process(root / "task", TASK, model_args)
    assert [response(s) for s in samples] == texts
    for metric, value in metrics.items():
        if "/" not in metric:
            assert results[f"{metric},none"] == pytest.approx(value, abs=1e-9), metric
    for sample, prediction in zip(samples, expected):
        (counts,) = sample["token_counts"]
        assert counts["crosstrim_method"] == "trimmed k=0.25"
        assert (counts["crosstrim_kept"], counts["crosstrim_valid"]) == (prediction.kept, prediction.valid)
        assert counts["crosstrim_kv_bytes_kept"] == prediction.kv_bytes_kept < prediction.kv_bytes_full
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(len(items)))


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
    summarized = adapter.trim_config("uniform", keep_ratio="0.5", summarize_dropped=True)
    assert summarized == TrimConfig(method="uniform", keep_ratio=0.5, summarize_dropped=True)
    dispatched = adapter.LlamaVisionTrimmed(pretrained=str(root / "model"), device_map="auto", dtype="float32")
    assert dispatched.device == torch.device("cpu") and dispatched.config == TrimConfig(k_ratio=0.25)
    _, pope = setup
    with pytest.raises(ValueError, match=r"write_task takes the items of one VLMEvalKit benchmark .* these mix"):
        lmms_tasks.write_task([pope[0], item_without_benchmark("x")], root / "bad", "bad")
    with pytest.raises(ValueError, match="do not give distinct Python names"):
        lmms_tasks.write_task([item_without_benchmark("a b"), item_without_benchmark("a-b")], root / "bad", "bad")


@pytest.mark.parametrize(
    ("given", "expected"),
    [(False, False), ("False", False), ("false", False), ("0", False), ("no", False), (True, True), ("True", True)],
)
def test_model_args_booleans_parse_strictly(given, expected):
    # bool("False") is True: a Python caller passing the string used to get the option it turned off.
    assert adapter.trim_config("trimmed", summarize_dropped=given).summarize_dropped is expected
    assert adapter.trim_config("trimmed", trim_first_layer_cache=given).trim_first_layer_cache is expected


def test_model_args_go_through_the_shared_option_parser():
    with pytest.raises(ValueError, match=r"summarize_dropped must be true or false .*got 'maybe'"):
        adapter.trim_config("trimmed", summarize_dropped="maybe")
    with pytest.raises(ValueError, match=r"seed must be a whole number, got '1\.5'"):
        adapter.trim_config("random", keep_ratio="0.5", seed="1.5")
    assert adapter.trim_config("mean", keep_ratio="0.5", seed="7") == TrimConfig(method="mean", keep_ratio=0.5, seed=7)


def item_without_benchmark(category: str):
    from crosstrim.evaluation.dataset import Item

    return Item("1", (Image.new("RGB", (8, 8)),), "q", "a", category)


def test_exact_match_scores_are_crosstrim_evals_accuracies():
    items = [item_without_benchmark(c) for c in ("local", "global", "local")]
    scores = lmms_tasks.exact_match_scores(items, ["A.", "b", "no"])
    assert scores == {"accuracy": 1 / 3, "local/accuracy": 0.5, "global/accuracy": 0.0}
