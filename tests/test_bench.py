"""`crosstrim bench` end to end on tiny models (seconds), its search and depth helpers, and its errors."""

import json

import pytest
import torch
from support import run_cli

from crosstrim import memory, tiny
from crosstrim.bench import capacity, summary
from crosstrim.bench.measure import status_bytes

ARGS = ["--dims", "tiny", "--batch", "1,2", "--text", "6", "--keep", "0.5,0.25", "--decode-steps", "2"]
ARGS += ["--repeats", "2", "--threads", "1"]


def test_bench_runs_end_to_end_and_writes_every_sample(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", *ARGS, "--out", tmp_path, "--tag", "t")
    assert code == 0, err
    assert "RANDOM WEIGHTS" in out and "1 thread(s)" in out  # says plainly what it measured on
    assert "KV cache bytes after prefill == memory model (self and cross, every run): yes" in out
    assert (tmp_path / "bench-t.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "bench-t.json").read_text())
    assert {"config", "versions", "machine", "summary", "samples"} <= set(result)
    assert result["machine"]["torch_threads"] == 1 and result["versions"]["torch"] == torch.__version__
    # Every (text, batch, variant, repeat) is a sample; full and trimmed alternate, order flipping per repeat.
    samples = result["samples"]
    assert len(samples) == 1 * 2 * 3 * 2
    assert [s["variant"] for s in samples[:6]] == ["full", "keep 0.5", "keep 0.25", "keep 0.25", "keep 0.5", "full"]
    assert all(len(s["decode_s"]) == 2 and len(s["layer_prefill_s"]) == 4 for s in samples)
    # Trimmed caches hold exactly the kept tokens the memory model predicts.
    mm = memory.MemoryModel.from_config(tiny.tiny_config(512, text_layers=4, cross_attention_layers=[1, 3]))
    for s in samples:
        r = {"full": 1.0, "keep 0.5": 0.5, "keep 0.25": 0.25}[s["variant"]]
        assert s["kv_cross_bytes"] == mm.cross_kv_bytes(torch.float32, batch=s["batch"], r=r)
        assert s["kv_self_bytes"] == mm.self_kv_bytes(6, torch.float32, batch=s["batch"])
    rows = {(r["batch"], r["variant"]): r for r in result["summary"]}
    row = rows[(2, "keep 0.25")]
    assert row["kept_fraction"] == pytest.approx(0.25, abs=0.01)
    assert row["decode_ratio"] == pytest.approx(row["decode_s"] / rows[(2, "full")]["decode_s"])
    assert row["decode_ratio_predicted"] == pytest.approx(
        mm.decode_ratio(torch.float32, batch=2, text_tokens=7, r=0.25)
    )


def test_bench_runs_on_a_checkpoint_directory(capsys, tmp_path, checkpoint_dir):
    argv = ["--model", checkpoint_dir, "--batch", "1", "--text", "4", "--keep", "0.5", "--decode-steps", "1"]
    code, out, err = run_cli(capsys, "bench", *argv, "--repeats", "1", "--threads", "1", "--out", tmp_path)
    assert code == 0, err
    assert f"checkpoint {checkpoint_dir}; fed random precomputed image features" in out
    assert "memory model (self and cross, every run): yes" in out
    result = json.loads((tmp_path / f"bench-{checkpoint_dir.name}-cpu.json").read_text())
    assert result["samples"][1]["valid"] == [4 * 17]  # every tile of the checkpoint's 4 x 17-token image slot


def test_memory_budget_search_reports_predicted_and_measured(capsys, tmp_path):
    argv = [*ARGS[:6], "--keep", "0.25", "--decode-steps", "1", "--repeats", "1", "--threads", "1"]
    budget_gb = f"{status_bytes('VmRSS') / 1e9 + 0.5:.2f}"  # what this process holds + 0.5 GB: always available
    code, out, err = run_cli(
        capsys, "bench", *argv, "--memory-budget", budget_gb, "--max-batch", "3", "--out", tmp_path
    )
    assert code == 0, err
    budget = json.loads((tmp_path / "bench-tiny-L4-cpu.json").read_text())["memory_budget"]
    assert [b["variant"] for b in budget] == ["full", "keep 0.25"]
    assert all(b["measured"] == 3 and b["predicted"] > 3 for b in budget)  # the tiny model fits; capped at 3
    assert "largest batch predicted" in out


@pytest.mark.parametrize("start", [1, 5, 9, 30])
def test_largest_fitting_walks_to_the_boundary_without_overshooting(start):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= 9

    assert capacity.largest_fitting(fits, start, limit=50) == 9
    assert max(probes) <= max(start, 10)  # never more than one batch beyond what fits, unless started there
    assert capacity.largest_fitting(lambda b: False, start, limit=50) == 0
    assert capacity.largest_fitting(lambda b: True, start, limit=12) == 12


def test_at_depth_composes_measured_layer_times():
    mm = memory.MemoryModel.from_config(tiny.tiny_config(512, text_layers=4, cross_attention_layers=[1, 3]))
    ref = memory.preset("11b")  # 32 self, 1 first cross, 7 later cross layers
    layer_s = [1.0, 10.0, 3.0, 5.0]  # self, first cross, self, later cross
    total = sum(layer_s) + 0.5  # embedding, head, masks
    assert summary.at_depth(layer_s, total, mm, ref) == pytest.approx(0.5 + 32 * 2.0 + 10.0 + 7 * 5.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "2"], ">= 2 cross-attention layers"),
        (["--layers", "3"], ">= 2 cross-attention layers"),
        (["--batch", "1,x"], "comma-separated integers"),
        (["--warmup", "-1"], "--warmup must be at least 0"),
        (["--dims", "7b"], "unknown --dims '7b'"),
        (["--keep", "1"], "at least one fraction below 1"),
        (["--keep", "2"], "fractions in (0, 1]"),
        (["--batch", "0"], "--batch must be positive"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--memory-budget", "-1"], "--memory-budget must be a positive"),
        (["--memory-budget", "100000"], "exceeds the"),
        (["--device", "cuda:7"], "CUDA is not available"),
        (["--model", "{ckpt}", "--layers", "4"], "--layers shapes the random model"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--model", "{missing}"], "does not exist"),
    ],
)
def test_bench_bad_input_is_one_clear_line_and_exit_2(capsys, tmp_path, checkpoint_dir, argv, message):
    argv = [a.format(ckpt=checkpoint_dir, missing=tmp_path / "nope") for a in argv]
    base = ["--dims", "tiny"] if "--model" not in argv and "--dims" not in argv else []
    code, _, err = run_cli(capsys, "bench", *base, *argv, "--out", tmp_path)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
