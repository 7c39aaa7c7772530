"""`crosstrim eval`, `viz` and `demo` on the shipped testbed checkpoint, and their bad-input errors."""

import json
from dataclasses import replace

import pytest
from PIL import Image
from support import run_cli

from crosstrim import cli
from crosstrim.evaluation import UserError, sources
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import Prediction
from crosstrim.evaluation.sweep import Setting
from crosstrim.testbed import data
from crosstrim.tools import eval as evaluate


def test_eval_writes_table_json_and_plot(tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "eval", "--limit", "6", "--k-ratios", "0.25", "--keep-ratios", "0.5", "--methods", "trimmed,random",
        "--out", tmp_path, "--device", "cpu", "--batch-size", "3", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    labels = ["full", "trimmed k=0.25", "trimmed keep=0.5", "random keep=0.5", "later layers: 1 token"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {label} |" in table for label in labels)
    assert "| accuracy | local | relational | global |" in table
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in result["runs"]] == labels
    assert {"torch", "transformers", "crosstrim"} <= set(result["versions"])
    assert result["skipped"] == [] and result["setup"]["headline"] is None  # the testbed has no official metric
    for r in result["runs"]:
        assert r["official"] is None
        assert len(r["predictions"]) == 6
        assert r["accuracy"] == sum(p["correct"] for p in r["predictions"]) / 6
    exact = next(r for r in result["runs"] if r["label"] == "random keep=0.5")
    assert all(p["kept"] == -(-p["valid"] // 2) for p in exact["predictions"])
    one = result["runs"][-1]
    assert all(p["kept"] == 1 for p in one["predictions"]) and one["kv_bytes_kept"] < one["kv_bytes_full"]
    with Image.open(tmp_path / "accuracy_vs_kept.png") as png:
        assert png.format == "PNG" and png.width > 400
    assert "full" in out and str(tmp_path / "results.md") in out


def test_eval_summarize_dropped_runs_every_selection_twice_with_the_same_kept_tokens(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "eval", "--limit", "4", "--k-ratios", "0.25", "--keep-ratios", "0.5", "--methods", "uniform",
        "--summarize-dropped", "--out", tmp_path, "--device", "cpu", "--batch-size", "4", "--max-new-tokens", "2",
    )  # fmt: skip
    assert code == 0, err
    runs = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert list(runs) == [
        "full",
        "trimmed k=0.25",
        "trimmed k=0.25 +summary",
        "uniform keep=0.5",
        "uniform keep=0.5 +summary",
        "later layers: 1 token",
    ]
    for label in ("trimmed k=0.25", "uniform keep=0.5"):
        plain, summary = runs[label], runs[f"{label} +summary"]
        assert summary["family"] == f"{plain['family']} +summary"
        assert [p["kept"] for p in summary["predictions"]] == [p["kept"] for p in plain["predictions"]]
        assert summary["kv_bytes_kept"] > plain["kv_bytes_kept"]  # one more cached token per later layer


def test_summary_counts_correct_answers_per_category():
    items = [
        Item(str(i), (), "q", answer, cat) for i, (answer, cat) in enumerate([("red", "a"), ("no", "a"), ("two", "b")])
    ]
    preds = [
        Prediction("0", "Red.", 2, 4, 100, 50),
        Prediction("1", "yes", 1, 4, 100, 40),
        Prediction("2", "two", 4, 4),
    ]
    run_ = Setting("x", "trimmed (k_ratio)", None)
    summary = evaluate.summarise(run_, sources.Dataset(items, sources.exact_match), preds)
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["official"] is None
    a = summary["per_category"]["a"]
    assert a == {"accuracy": 0.5, "correct": 1, "kept_fraction": 0.375, "items": 2, "interval95": a["interval95"]}
    assert a["interval95"] == pytest.approx((0.0945, 0.9055), abs=1e-4)  # Wilson 95% of 1/2
    assert (summary["correct"], summary["items"]) == (2, 3)
    assert summary["kept_fraction"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert summary["kv_bytes_kept"] == 45


def test_exact_match_compares_leading_words_only():
    item = Item("0", (), "q", "red", "c")
    assert sources.exact_match(item, "Red, it is.") and not sources.exact_match(item, "it is red")
    assert not sources.exact_match(Item("0", (), "q", "", "c"), "")


def test_eval_reads_a_jsonl_dataset_skipping_bad_lines(tmp_path, capsys):
    assert cli.main(["testbed", "data", "--out", str(tmp_path / "d"), "--count", "3"]) == 0
    file = tmp_path / "d" / "heldout.jsonl"
    with file.open("a") as handle:  # lines 4 and 5: not JSON; an image that is not there
        handle.write("{not json\n" + json.dumps({"id": "x", "images": ["gone.png"], "prompt": "p", "answer": "a"}))
    argv = ["eval", "--data", file, "--out", tmp_path / "r", "--device", "cpu", "--max-new-tokens", "2"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "heldout.jsonl line 4: not JSON" in err and "--skip-bad" in err
    code, _, err = run_cli(
        capsys, *argv, "--skip-bad", "--k-ratios", "0.5", "--keep-ratios", "0.5", "--methods", "uniform"
    )  # fmt: skip
    assert code == 0, err
    assert "skipped 2 bad rows (first: heldout.jsonl line 4: not JSON" in err
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["setup"]["items"] == 3 and result["setup"]["data"].endswith("heldout.jsonl")
    assert [(s["where"], s["index"]) for s in result["skipped"]] == [
        ("heldout.jsonl line 4", ""),
        ("heldout.jsonl line 5", "x"),
    ]
    assert result["skipped"][1]["reason"] == f"image {str(file.parent / 'gone.png')!r} does not exist"


def test_viz_writes_a_png_for_a_testbed_item_and_for_an_image_file(tmp_path, capsys):
    code, out, err = run_cli(capsys, "viz", "--out", tmp_path / "a.png", "--device", "cpu", "--k-ratio", "0.1")
    assert code == 0, err
    assert "kept" in out
    with Image.open(tmp_path / "a.png") as png:
        assert png.width > 600 and png.height > 400
    data.heldout(1, start=4)[0].images[0].save(tmp_path / "img.png")
    code, out, err = run_cli(
        capsys, "viz", "--image", tmp_path / "img.png", "--prompt", "how many shapes are there ?", "--out",
        tmp_path / "b.png", "--device", "cpu", "--method", "random", "--keep-ratio", "0.3",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_demo_answers_full_and_trimmed_side_by_side(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--count", "4", "--viz", tmp_path / "demo.png", "--device", "cpu")
    assert code == 0, err
    assert "trimming: trimmed k=0.25" in out and "KB ->" in out and "saved" in out
    assert sum(line.startswith(data.FAMILIES) for line in out.splitlines()) == 4
    assert (tmp_path / "demo.png").is_file()


def test_overlap_of_top_tokens():
    import torch

    from crosstrim.tools import viz

    valid = torch.tensor([True, True, True, True, False])
    first = torch.tensor([4.0, 3.0, 0.0, 0.0, 9.0])
    assert viz.overlap(first, torch.tensor([5.0, 0.0, 0.0, 0.0, 9.0]), valid, 0.25) == 1.0
    assert viz.overlap(first, torch.tensor([0.0, 0.0, 5.0, 0.0, 9.0]), valid, 0.25) == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--data", "{csv}"], "unknown dataset format '.csv'"),
        (["eval", "--data", "{garbage}"], "line 1: not JSON"),
        (
            ["eval", "--data", "{missing_keys}"],
            "line 1: missing 'images', 'answer'; fix it, or skip bad lines with --skip-bad",
        ),
        (["eval", "--skip-bad"], "--skip-bad and --benchmark apply to a --data file"),
        (["eval", "--benchmark", "MME"], "--skip-bad and --benchmark apply to a --data file"),
        (["eval", "--data", "{missing_keys}", "--benchmark", "MME"], "--benchmark chooses how a VLMEvalKit .tsv"),
        (["eval", "--limit", "0"], "--limit, --batch-size and --max-new-tokens must be at least 1"),
        (["eval", "--threads", "0"], "--threads must be at least 1, got 0"),
        (["eval", "--dtype", "fp64"], "unknown --dtype 'fp64'; use auto, float32, fp32"),
        (["eval", "--data", "{empty}"], "has no items"),
        (["eval", "--data", "{nowhere}"], "does not exist"),
        (["eval", "--model", "{not_mllama}"], "'llama' model"),
        (["eval", "--k-ratios", "0.5,x"], "--k-ratios must be a number, got 'x'"),
        (["eval", "--keep-ratios", "0.5,1.5"], "--keep-ratios must be in (0, 1], got 1.5"),
        (["eval", "--seed", "x"], "--seed must be a whole number, got 'x'"),
        (["eval", "--methods", "best"], "--methods: unknown method 'best'"),
        (["viz", "--model", "{not_mllama}"], "'llama' model"),
        (["viz", "--image", "{csv}", "--prompt", "what ?"], "cannot read image"),
        (["viz", "--out", "{garbage}"], "must name a .png"),
        (["viz", "--image", "{csv}", "--image", "{csv}", "--prompt", "what ?"], "viz draws one image, got 2 --image"),
        (["viz", "--keep-ratio", "0"], "--keep-ratio must be in (0, 1], got 0.0"),
        (["demo", "--k-ratio", "x"], "--k-ratio must be a number, got 'x'"),
        (["demo", "--model", "{nowhere}"], "does not exist"),
        (["testbed", "data", "--out", "{nowhere}", "--count", "0"], "--count must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "not_mllama").mkdir()
    (tmp_path / "not_mllama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    places = {
        "csv": tmp_path / "data.csv",
        "garbage": tmp_path / "garbage.jsonl",
        "missing_keys": tmp_path / "keys.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "nowhere": tmp_path / "nowhere.jsonl",
        "not_mllama": tmp_path / "not_mllama",
    }
    places["csv"].write_text("a,b\n")
    places["garbage"].write_text("{not json\n")
    places["missing_keys"].write_text(json.dumps({"id": 1, "prompt": "p"}) + "\n")
    places["empty"].write_text("\n")
    code, _, err = (
        run_cli(capsys, *[a.format(**{k: str(v) for k, v in places.items()}) for a in argv], "--device", "cpu")
        if argv[0] != "testbed"
        else run_cli(capsys, *[a.format(**{k: str(v) for k, v in places.items()}) for a in argv])
    )
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_sources_registry_is_keyed_by_suffix():
    assert set(sources.SOURCES) >= {".jsonl"}
    with pytest.raises(UserError, match="unknown dataset format"):
        sources.load("x.tsv" if ".tsv" not in sources.SOURCES else "x.parquet")


def test_encode_pads_left_without_changing_the_callers_processor():
    from crosstrim.evaluation import inference
    from crosstrim.testbed import model as testbed_model

    processor = testbed_model.build_processor()
    processor.tokenizer.padding_side = "right"
    short, long = data.heldout(2)
    long = replace(long, prompt="how many shapes are there ? how many shapes are there ?")
    mask = inference.encode(processor, [short, long], "cpu")["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())  # left padding
    assert processor.tokenizer.padding_side == "right"


def test_eval_counts_kept_over_valid_tokens_and_shows_counts_beside_accuracy(tmp_path, capsys):
    """Ratio 1 keeps 100% of the real tokens (padding-tile slots are not counted as kept: they made it
    208%); every accuracy shows correct/items, and the widest 95% interval is printed."""
    code, out, err = run_cli(
        capsys, "eval", "--limit", "3", "--k-ratios", "1", "--keep-ratios", "0.999", "--methods", "uniform",
        "--out", tmp_path, "--device", "cpu", "--max-new-tokens", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "testbed held-out split (seed 557), the first 3 items" in out
    result = json.loads((tmp_path / "results.json").read_text())
    by_label = {r["label"]: r for r in result["runs"]}
    assert by_label["trimmed k=1"]["kept_fraction"] == 1.0
    assert all(p["kept"] == p["valid"] for p in by_label["trimmed k=1"]["predictions"])
    assert "| trimmed k=1 | 100.0% ± 0.0% |" in out
    # Ratio 1 caches every slot (as full); 0.999 keeps the same real tokens and drops the padding tiles.
    assert by_label["trimmed k=1"]["kv_bytes_kept"] == by_label["trimmed k=1"]["kv_bytes_full"]
    assert by_label["uniform keep=0.999"]["kv_bytes_kept"] < by_label["uniform keep=0.999"]["kv_bytes_full"]
    assert "k=0.999 saves cache" in out
    full = by_label["full"]
    assert f"| {full['accuracy']:.1%} ({full['correct']}/3) |" in out
    assert "Accuracy cells: correct/items. 95% intervals are in results.json; the widest here, " in out
    assert full["interval95"][0] < full["accuracy"] <= full["interval95"][1]
