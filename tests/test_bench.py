"""`crosstrim bench` end to end on tiny models (seconds), its search and depth helpers, and its errors."""

import argparse
import json

import pytest
import torch
from support import run_cli

import crosstrim
from crosstrim import tiny
from crosstrim.bench import capacity, summary, vision
from crosstrim.bench.measure import Clock, status_bytes
from crosstrim.engine import memory

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


def test_memory_budget_search_reports_predicted_and_measured(capsys, tmp_path, monkeypatch):
    calls, generate = [], crosstrim.generate

    def recorded(model, *, prefill_batch_size, **kwargs):
        calls.append((len(kwargs["input_ids"]), prefill_batch_size, "pixel_values" in kwargs))
        return generate(model, prefill_batch_size=prefill_batch_size, **kwargs)

    monkeypatch.setattr(crosstrim, "generate", recorded)
    argv = [*ARGS[:6], "--keep", "0.25", "--decode-steps", "1", "--repeats", "1", "--threads", "1"]
    budget_gb = f"{status_bytes('VmRSS') / 1e9 + 0.5:.2f}"  # what this process holds + 0.5 GB: always available
    argv += ["--memory-budget", budget_gb, "--max-batch", "3", "--prefill-batch", "2"]
    code, out, err = run_cli(capsys, "bench", *argv, "--out", tmp_path)
    assert code == 0, err
    # Every probe is a user's call: pixels in, micro-batched prefill; per variant a calibration (one micro-batch),
    # then the search from the prediction (capped at 3).
    assert calls == [(2, 2, True), (3, 2, True)] * 3
    budget = json.loads((tmp_path / "bench-tiny-L4-cpu.json").read_text())["memory_budget"]
    assert [b["variant"] for b in budget] == ["full", "keep 0.25", "k_ratio 0.25"]  # the paper's rule searched too
    assert all(b["measured"] == 3 and b["predicted"] > 3 for b in budget)  # the tiny model fits; capped at 3
    assert "largest batch predicted" in out
    assert "KV cache bytes of every calibration run == memory model: yes" in out
    for b in budget:  # every probe ran crosstrim.generate: a peak, a time to first token, every decode step
        assert set(b["footprint"]) == {"held", "kv", "inputs", "transient", "merge"}
        assert len(b["at_largest"]["decode_s"]) == 1 and b["tok_s"] == pytest.approx(3 / b["decode_s"])
        assert 0 < b["at_largest"]["peak_bytes"] <= float(budget_gb) * 1e9
    assert budget[1]["footprint"]["kv"] < budget[0]["footprint"]["kv"]  # trimmed: a smaller cache per sample
    assert budget[1]["batch_ratio"] == 1.0 and "tok_s_ratio_predicted" in budget[1]
    assert (tmp_path / "bench-tiny-L4-cpu-capacity.png").read_bytes()[:4] == b"\x89PNG"


def test_footprint_counts_the_merge_and_the_transient():
    fp = capacity.Footprint(held=10, kv=3, inputs=1, transient=5, merge=2)
    assert fp.peak(4) == 10 + 4 * 4 + max(5, 4 * 2)
    assert fp.largest_batch(34) == 4 and fp.largest_batch(33) == 3  # at 4 the merge (8) outgrows the transient (5)
    no_merge = capacity.Footprint(held=10, kv=3, inputs=1, transient=5, merge=0)
    assert no_merge.largest_batch(30) == 3 and no_merge.largest_batch(31) == 4
    assert fp.largest_batch(14) == 0  # not even one sample


def test_merge_holds_one_trimmed_layers_keys_of_the_batch_twice():
    """crosstrim.generate fills the layers every micro-batch shares in place; only the trimmed layers, whose
    widths differ per micro-batch, are joined at the end, one layer at a time."""
    mm = memory.MemoryModel.from_config(tiny.tiny_config(512, text_layers=4, cross_attention_layers=[1, 3]))
    keys = mm.kv_bytes_per_token(torch.float32) // 2
    assert capacity.merge_bytes(mm, torch.float32, kept=None) == 0
    assert capacity.merge_bytes(mm, torch.float32, kept=17) == keys * 17


def test_decode_time_model_recovers_linear_layer_costs():
    mm = memory.MemoryModel.from_config(tiny.tiny_config(512, text_layers=4, cross_attention_layers=[1, 3]))
    n = mm.image_tokens

    def measured(batch, kept):  # self 1 + 2B, cross 3 + B + 0.01 B w, rest 0.5 + 0.1 B
        self_t, cross = 1 + 2 * batch, [3 + batch + 0.01 * batch * w for w in (n, kept or n)]
        layers = [self_t, cross[0], self_t, cross[1]]
        at = {"layer_decode_s": layers, "decode_s": [sum(layers) + 0.5 + 0.1 * batch], "kept_width": kept}
        return {"measured": batch, "at_largest": at}

    results = [measured(4, None), measured(9, 17), measured(12, 7)]
    step = capacity.decode_time_model(results, mm, first=False)
    want = 0.5 + 0.1 * 50 + 30 * (1 + 2 * 50) + (3 + 50 + 0.01 * 50 * n) + 7 * (3 + 50 + 0.01 * 50 * 20)
    assert step(50, 30, [n] + [20] * 7) == pytest.approx(want)
    assert capacity.decode_time_model([measured(4, None), measured(4, 17)], mm, first=False) is None  # one batch


def test_compose_predicts_the_full_depth_batch_gain(monkeypatch):
    monkeypatch.setattr(capacity, "full_weights_bytes", lambda dims, dtype: 21_340_441_670)  # 11B, bf16, counted
    ref, dtype = memory.preset("11b"), torch.bfloat16
    mm = memory.MemoryModel.from_config(memory.preset_config("11b"))
    args = argparse.Namespace(trim_first_layer_cache=False, text_values=[32], decode_steps=2, full_depth_budget=80)
    args.dims = "11b"
    fp = {"held": 3e9, "kv": 0, "inputs": 7_690_000, "transient": 4e8, "merge": 0}
    results = [
        {"variant": v, "kept_fraction": r, "footprint": fp, "measured": 1} for v, r in [("full", 1), ("k", 0.25)]
    ]
    rows = capacity.compose(results, mm, ref, args, dtype, weights=2_020_000_000, vision={"transient_bytes": 2e9})
    held = 21_340_441_670 + 3e9 - 2_020_000_000
    for row, r, kept in zip(rows, (1.0, 0.25), (None, 1601)):
        kv = ref.kv_bytes(dtype, text_tokens=34, r=r).total
        want = capacity.Footprint(held, kv, 7_690_000, 2e9, capacity.merge_bytes(ref, dtype, kept))
        assert row["batch"] == want.largest_batch(80e9) > 0
    assert 2.0 < rows[1]["batch_ratio"] < 2.9  # 210 MB -> 72 MB of cross KV, less the untrimmed inputs
    assert "tok_s" not in rows[0]  # no decode times measured: no tokens/s composed


def test_vision_encoder_time_is_composed_from_its_layers():
    config = tiny.tiny_config(512, vision_layers=3, vision_global_layers=2)
    v = vision.time_vision(config, torch.device("cpu"), torch.float32, 1, Clock(torch.device("cpu")))
    t = v["measured_s"]
    assert min(t.values()) >= 0 and v["layers"] == {"local": 3, "global": 2}
    assert v["seconds_per_image"] == pytest.approx(t["rest"] + 3 * t["local"] + 2 * t["global"] + t["projector"])
    assert v["tokens_per_image"] == 4 * 17 and v["transient_bytes"] >= v["measured_peak_bytes"]


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
        (["--full-depth-budget", "0"], "--full-depth-budget must be a positive"),
        (["--prefill-batch", "0"], "--prefill-batch must be at least 1"),
        (["--real-vision"], "--real-vision builds a preset's vision encoder"),
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
