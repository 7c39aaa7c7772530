"""`crosstrim calibrate` and `crosstrim.evaluation.calibration`: the statistics against hand-computed
values, the recommendation rule on synthetic numbers, the CLI end to end (testbed, a checkpoint with a
folder of images, torchrun) and its errors."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from support import run_cli

from crosstrim.core import TrimConfig
from crosstrim.evaluation import calibration, sweep
from crosstrim.evaluation.calibration import Answer, RequestRecord
from crosstrim.evaluation.sweep import Setting


def test_wilson_interval_matches_hand_computed_values():
    # 8/10: centre (0.8 + z²/20) / (1 + z²/10) = 0.71674, half-width 0.22658 (z = 1.95996).
    low, high = sweep.wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)
    # 0/n and n/n: the interval has width z²/(n + z²), not zero as the normal approximation claims.
    z2 = sweep.Z_95**2
    assert sweep.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert sweep.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert sweep.wilson_interval(300, 300)[0] == pytest.approx(0.98736, abs=1e-5)
    # The ends are exact (rounding gave 0.9999999999999998 for 300/300, and plots need p inside its interval).
    assert all(sweep.wilson_interval(n, n)[1] == 1.0 and sweep.wilson_interval(0, n)[0] == 0.0
               for n in (10, 300, 600))  # fmt: skip
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError, match="successes"):
            sweep.wilson_interval(*bad)


def test_first_token_divergence_matches_hand_computed_values():
    full = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # p = (0.5, 0.5); second row equals its other side
    other = torch.tensor([[math.log(9.0), 0.0], [1.0, 2.0]])  # q = (0.9, 0.1)
    tv, kl = calibration.first_token_divergence(full, other)
    assert tv[0].item() == pytest.approx(0.4)  # (|0.5-0.9| + |0.5-0.1|) / 2
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))  # 0.51083 nats
    assert tv[1].item() == pytest.approx(0.0, abs=1e-7) and kl[1].item() == pytest.approx(0.0, abs=1e-7)
    # A probability that underflows in float32 leaves KL large but finite.
    tv, kl = calibration.first_token_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[200.0, 0.0]]))
    assert tv.item() == pytest.approx(0.5) and math.isfinite(kl.item()) and kl.item() > 50


def _records(agreements: dict[str, tuple[int, int]], n: int) -> tuple[list[RequestRecord], list[Setting]]:
    """``n`` requests; setting ``label`` agrees with "full" on the first ``agree`` and keeps ``kept`` of 100."""
    settings = [Setting(label, "trimmed (keep_ratio)", TrimConfig(keep_ratio=0.5)) for label in agreements]
    records = []
    for i in range(n):
        answers = {
            label: Answer("full" if i < agree else "other", kept, 100, 1000, 10 * kept, 0.1, 0.2)
            for label, (agree, kept) in agreements.items()
        }
        records.append(RequestRecord(str(i), "full", answers))
    return records, settings


def test_recommendation_takes_the_least_kept_setting_whose_lower_bound_meets_the_target():
    # 100 requests: Wilson lower bounds 100/100 -> 96.3%, 99/100 -> 94.6%, 97/100 -> 91.5%.
    records, settings = _records({"a": (100, 80), "b": (100, 50), "c": (99, 30), "d": (97, 10)}, 100)
    results = calibration.summarise(records, settings, target=0.95)
    by = {r.label: r for r in results}
    assert [by[k].agree for k in "abcd"] == [100, 100, 99, 97]
    assert by["c"].agreement == 0.99 and by["c"].agreement_low == pytest.approx(0.94551, abs=1e-5)
    assert [by[k].meets_target for k in "abcd"] == [True, True, False, False]
    # c's point estimate (99%) passes 95% and keeps less than b; its lower bound does not: b is chosen.
    assert calibration.recommend(results).label == "b"
    assert by["b"].kept_fraction == 0.5 and by["b"].kv_bytes_kept == 500 and by["b"].total_variation == 0.1
    # A lower target admits c and d; the least kept wins.
    assert calibration.recommend(calibration.summarise(records, settings, target=0.9)).label == "d"
    # Nothing meets 99% at n = 100 (the best lower bound is 96.3%).
    assert calibration.recommend(calibration.summarise(records, settings, target=0.99)) is None


def test_recommendation_ties_go_to_the_smaller_cache_then_the_higher_agreement():
    records, settings = _records({"x": (100, 50), "y": (98, 50)}, 100)
    results = calibration.summarise(records, settings, target=0.9)
    assert calibration.recommend(results).label == "x"  # same kept share and cache: higher agreement
    # A summary token costs cache at the same kept share: the plain setting wins the tie.
    plain, summary = results
    cheaper = calibration.SettingResult(**{**plain.__dict__, "label": "z", "kv_bytes_kept": plain.kv_bytes_kept - 1})
    assert calibration.recommend([summary, plain, cheaper]).label == "z"


def test_plan_sweeps_k_ratios_then_budgets_per_method_with_summary_variants():
    settings = sweep.plan([0.25], [0.5], ["trimmed", "random"], summarize=True, seed=3)
    assert [s.label for s in settings] == [
        "trimmed k=0.25",
        "trimmed k=0.25 +summary",
        "trimmed keep=0.5",
        "trimmed keep=0.5 +summary",
        "random keep=0.5",
        "random keep=0.5 +summary",
    ]
    assert settings[1].config == TrimConfig(k_ratio=0.25, seed=3, summarize_dropped=True)
    assert settings[4].config == TrimConfig("random", keep_ratio=0.5, seed=3)


def test_calibrate_cli_on_the_testbed_writes_table_json_and_plot(tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "calibrate", "--device", "cpu", "--limit", "6", "--batch-size", "3", "--max-new-tokens", "3",
        "--k-ratios", "0.5", "--keep-ratios", "0.25", "--methods", "trimmed,random", "--target", "0.5",
        "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert set(result) == {
        "setup", "versions", "target", "criterion", "divergence", "recommended", "settings", "requests",
    }  # fmt: skip
    assert result["target"] == 0.5 and result["criterion"] == "wilson_lower_95"
    assert result["setup"]["items"] == 6 and result["setup"]["processes"] == 1
    labels = ["trimmed k=0.5", "trimmed keep=0.25", "random keep=0.25"]
    assert [s["label"] for s in result["settings"]] == labels
    assert len(result["requests"]) == 6
    for s in result["settings"]:
        assert set(s) == set(calibration.SettingResult.__dataclass_fields__)
        agree = sum(r["answers"][s["label"]]["text"] == r["full"] for r in result["requests"])
        assert s["agree"] == agree and s["agreement"] == agree / 6
        assert (s["agreement_low"], s["agreement_high"]) == pytest.approx(sweep.wilson_interval(agree, 6))
        assert s["meets_target"] == (s["agreement_low"] >= 0.5)
        assert 0 < s["kept_fraction"] < 1 and s["kv_bytes_kept"] < s["kv_bytes_full"]
        assert 0 <= s["total_variation"] <= 1 and s["kl"] >= 0
    passing = [s for s in result["settings"] if s["meets_target"]]
    expected = min(passing, key=lambda s: s["kept_fraction"])["label"] if passing else None
    assert result["recommended"] == expected
    exact = result["settings"][1]
    assert all(r["answers"][exact["label"]]["kept"] == -(-r["answers"][exact["label"]]["valid"] // 4)
               for r in result["requests"])  # fmt: skip
    table = (tmp_path / "calibration.md").read_text()
    assert all(f"| {label}" in table for label in ["full", *labels])
    assert ("Recommended:" in table) == (expected is not None)
    with Image.open(tmp_path / "calibration.png") as png:
        assert png.format == "PNG" and png.width > 400
    assert str(tmp_path / "calibration.json") in out


def test_calibrate_cli_on_a_checkpoint_and_a_folder_of_images(tmp_path, capsys, checkpoint_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, width in [("b.png", 64), ("a.jpg", 32), ("c.png", 96)]:
        Image.fromarray(rng.integers(0, 255, (32, width, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    code, _, err = run_cli(
        capsys, "calibrate", "--model", checkpoint_dir, "--device", "cpu", "--data", folder,
        "--prompt", "what is shown ?", "--k-ratios", "1.0,0.25", "--keep-ratios", "", "--max-new-tokens", "3",
        "--target", "0.4", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert [r["id"] for r in result["requests"]] == ["a.jpg", "b.png", "c.png"]
    identity, trimmed = result["settings"]
    # Ratio 1.0 computes exactly what the full model computes: total agreement, no divergence.
    assert identity["agree"] == 3 and identity["total_variation"] == 0 and identity["kl"] == 0
    # 3/3 has a Wilson lower bound of 43.8%: identity meets 40%; k=0.25 only if it agrees on all three.
    assert result["recommended"] == ("trimmed k=0.25" if trimmed["agree"] == 3 else "trimmed k=1")
    assert trimmed["kept_fraction"] < 1
    assert result["setup"]["data"] == str(folder)  # a user's data is used whole without --limit
    # With --limit, the output says how much of the data was used.
    code, out, err = run_cli(
        capsys, "calibrate", "--model", checkpoint_dir, "--device", "cpu", "--data", folder, "--limit", "2",
        "--prompt", "what is shown ?", "--k-ratios", "0.25", "--keep-ratios", "", "--max-new-tokens", "1",
        "--out", tmp_path / "limited",
    )  # fmt: skip
    assert code == 0, err
    limited = json.loads((tmp_path / "limited" / "calibration.json").read_text())
    assert [r["id"] for r in limited["requests"]] == ["a.jpg", "b.png"]
    assert limited["setup"]["data"] == f"{folder} (first 2 of 3)"
    assert "first 2 of 3" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "{folder}"], "is a folder: give the question to ask of its images with --prompt"),
        (["--data", "{jsonl}", "--prompt", "x"], "a --data file carries its own prompts"),
        (["--prompt", "x"], "--prompt asks one question of a --data folder"),
        (["--data", "{bad}"], "bad.jsonl line 1: expected an object with 'images'"),
        (["--data", "{empty}", "--prompt", "x"], "holds no images"),
        (["--data", "{missing}"], "missing.jsonl line 1: image"),
        (["--target", "1.5"], "--target is an agreement in (0, 1]"),
        (["--methods", "best"], "unknown method 'best'"),
        (["--k-ratios", "", "--keep-ratios", ""], "nothing to calibrate"),
    ],
)
def test_calibrate_cli_errors_name_the_problem(tmp_path, capsys, argv, message):
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (48, 48)).save(folder / "x.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.jsonl").write_text(json.dumps({"images": ["folder/x.png"], "prompt": "q"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"images": ["folder/x.png"]}) + "\n")
    (tmp_path / "missing.jsonl").write_text(json.dumps({"images": ["nowhere.png"], "prompt": "q"}) + "\n")
    paths = {
        "folder": folder,
        "jsonl": tmp_path / "ok.jsonl",
        "bad": tmp_path / "bad.jsonl",
        "empty": tmp_path / "empty",
        "missing": tmp_path / "missing.jsonl",
    }
    argv = [a.format(**paths) for a in argv]
    code, _, err = run_cli(capsys, "calibrate", "--device", "cpu", "--out", tmp_path / "out", *argv)
    assert code == 2 and message in err and err.startswith("crosstrim calibrate: error:")


def test_unlabelled_jsonl_requests_need_no_answer_and_number_their_lines(tmp_path):
    Image.new("RGB", (48, 48)).save(tmp_path / "x.png")
    lines = [{"images": ["x.png"], "prompt": "q1"}, {"id": "k", "images": ["x.png"], "prompt": "q2", "answer": "red"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    items = calibration.load_requests(tmp_path / "r.jsonl")
    assert [(i.id, i.prompt, i.answer) for i in items] == [("1", "q1", ""), ("k", "q2", "")]


def test_calibrate_under_torchrun_gives_the_results_of_one_process(tmp_path):
    # Batches of 4 over 8 items: each process's even shard is one of the single process's batches, so the
    # padding, and with it every float (first-token divergences included), is the same.
    args = ["calibrate", "--device", "cpu", "--limit", "8", "--batch-size", "4", "--max-new-tokens", "3"]
    args += ["--k-ratios", "0.25", "--keep-ratios", "0.5", "--methods", "random"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        done = subprocess.run(
            [*launcher, "-m", "crosstrim.cli", *args, "--out", str(out)], capture_output=True, text=True, env=env,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[processes] = json.loads((out / "calibration.json").read_text())
        assert results[processes]["setup"]["processes"] == processes
    assert len(results[1]["requests"]) == 8
    for key in ("settings", "requests", "recommended"):
        assert results[1][key] == results[2][key]


def test_testbed_data_seed_draws_fresh_questions_and_refuses_training_seeds(tmp_path, capsys):
    from crosstrim.testbed import data, train

    code, out, err = run_cli(capsys, "testbed", "data", "--out", tmp_path / "a", "--count", "3", "--seed", "1001")
    assert code == 0, err
    assert "split seed 1001" in out
    lines = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"testbed-1001-{i}" for i in range(3)]
    assert [r["prompt"] for r in lines] == [data.make_item(1001, i).prompt for i in range(3)]
    assert calibration.load_requests(tmp_path / "a" / "heldout.jsonl")[0].id == "testbed-1001-0"
    run_cli(capsys, "testbed", "data", "--out", tmp_path / "b", "--count", "1")  # default: the held-out split
    assert json.loads((tmp_path / "b" / "heldout.jsonl").read_text())["id"] == f"testbed-{data.HELDOUT_SEED}-0"
    for seed in (data.TRAIN_SEED, train.VALID_SEED):
        code, _, err = run_cli(capsys, "testbed", "data", "--out", tmp_path / "c", "--seed", seed)
        assert code == 2 and "training or validation split's seed" in err
