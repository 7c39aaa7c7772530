"""`crosstrim batch` on a tiny checkpoint: answers, resume after an interruption, bad rows, memory budget."""

import json
import math
import re

import pytest
import torch
from support import image, needs_testbed_checkpoint, run_cli

import crosstrim
from crosstrim.engine import memory
from crosstrim.evaluation import checkpoint
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import encode, predict
from crosstrim.tools import batch as batch_tool

PROMPTS = ["what is the color ?", "how many shapes are there ?", "describe it", "what is it ?", "left or right ?"]
TILES = [1, 4, 2, 1, 2]


@pytest.fixture
def requests(tmp_path):
    """Five requests (one with two images) and their image files, beside the requests file."""
    (tmp_path / "img").mkdir()
    rows = []
    for i, (prompt, tiles) in enumerate(zip(PROMPTS, TILES)):
        image(tiles, seed=i).save(tmp_path / "img" / f"{i}.png")
        images = [f"img/{i}.png"] + (["img/0.png"] if i == 2 else [])
        rows.append({"id": f"r{i}", "images": images, "prompt": prompt})
    path = tmp_path / "requests.jsonl"
    write(path, rows)
    return path


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_batch(capsys, checkpoint_dir, requests, out, *extra):
    return run_cli(
        capsys, "batch", "--model", checkpoint_dir, "--requests", requests, "--out", out, "--device", "cpu",
        "--max-new-tokens", "3", *extra,
    )  # fmt: skip


def test_answers_equal_model_generate_and_report_what_was_kept(capsys, checkpoint_dir, requests, tmp_path):
    out = tmp_path / "answers.jsonl"
    code, stdout, err = run_batch(
        capsys, checkpoint_dir, requests, out, "--batch-size", "3", "--prefill-batch-size", "2", "--k-ratio", "0.1"
    )
    assert code == 0, err
    rows = read(out)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    # The same batches answered by model.generate (one-shot prefill), as crosstrim eval answers them.
    model, processor = checkpoint.load(checkpoint_dir, "cpu", "float32")
    items = [
        Item(r["id"], tuple(checkpoint.load_image(requests.parent / p) for p in r["images"]), r["prompt"], "", "")
        for r in read(requests)
    ]
    with torch.no_grad():
        expected = predict(model, processor, items, crosstrim.TrimConfig(k_ratio=0.1), batch_size=3, max_new_tokens=3)
    assert [r["answer"] for r in rows] == [p.text for p in expected]
    assert [(r["kept"], r["valid"]) for r in rows] == [(p.kept, p.valid) for p in expected]
    # The KV figures are those of the request run alone, measured on the cache (no slot of the batch's).
    layers = model.config.text_config.cross_attention_layers
    for row, item in zip(rows, items):
        alone = encode(processor, [item], "cpu")
        with torch.no_grad():
            full = model(**alone, use_cache=True).past_key_values
            with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)):
                kept = model(**alone, use_cache=True).past_key_values
        measured = [memory.held_kv_bytes(cache, layers).cross_attn for cache in (full, kept)]
        assert [row["kv_bytes_full"], row["kv_bytes_kept"]] == measured
    assert all(r["kept"] < r["valid"] for r in rows)
    kept = sum(r["kept"] for r in rows) / sum(r["valid"] for r in rows)
    assert f"answered 5 of 5 requests into {out}; kept {kept:.1%} of image tokens" in stdout
    assert "% saved" in stdout


def test_an_interrupted_run_resumes_without_answering_twice_or_losing_any(
    capsys, monkeypatch, checkpoint_dir, requests, tmp_path
):
    reference = tmp_path / "reference.jsonl"
    assert run_batch(capsys, checkpoint_dir, requests, reference, "--batch-size", "2")[0] == 0

    out = tmp_path / "answers.jsonl"
    real_answer, calls = batch_tool.answer, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first batch's answers are on disk before the second batch starts
            assert [r["id"] for r in read(out)] == ["r0", "r1"]
            raise KeyboardInterrupt  # Ctrl-C while the second batch decodes
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(batch_tool, "answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert [r["id"] for r in read(out)] == ["r0", "r1"]  # the first batch was written when it finished
    monkeypatch.setattr(batch_tool, "answer", real_answer)

    # A kill in the middle of a write leaves a cut-off last line: it is dropped and answered again.
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:10])
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 0, err
    assert "dropped an incomplete last line" in err
    assert "4 to answer (1 already in" in err
    assert read(out) == read(reference)
    assert "answered 5 of 5 requests" in stdout

    # Everything answered: nothing to do, the file is left as it is.
    before = out.read_text()
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out)
    assert code == 0 and out.read_text() == before and "answered 5 of 5" in stdout


def test_bad_rows_name_the_row_and_exit_2_or_are_skipped(capsys, checkpoint_dir, requests, tmp_path):
    rows = read(requests)
    (tmp_path / "img" / "broken.png").write_text("not an image")
    bad_rows = [
        *rows[:2],
        {"id": "no-prompt", "images": ["img/0.png"]},
        "{not json",
        {"id": "missing", "images": ["img/nowhere.png"], "prompt": "what ?"},
        {"id": "broken", "images": ["img/broken.png"], "prompt": "what ?"},
        {"id": "two-tokens", "images": ["img/0.png"], "prompt": "<|image|> <|image|> what ?"},
        *rows[2:],
    ]
    write(requests, bad_rows)
    out = tmp_path / "answers.jsonl"
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    assert code == 2
    assert err.startswith("crosstrim batch: error: requests.jsonl line 3: missing 'prompt'") and "--skip-bad" in err
    assert not out.exists()

    # Rows that only fail when their batch loads (an undecodable image) stop the run after the answers before.
    write(requests, bad_rows[:2] + bad_rows[5:])
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 2
    assert "line 3 (id 'broken'): cannot read image" in err
    assert [r["id"] for r in read(out)] == ["r0", "r1"]

    write(requests, bad_rows)
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out, "--skip-bad", "--memory-budget", "1")
    assert code == 0, err
    assert sorted(r["id"] for r in read(out)) == [f"r{i}" for i in range(5)]
    assert "answered 5 of 10 requests" in stdout
    assert "skipped 5 bad rows" in err
    for message in [
        "requests.jsonl line 3: missing 'prompt'",
        "requests.jsonl line 4: not JSON",
        "requests.jsonl line 5: image",
        "line 6 (id 'broken'): cannot read image",
        "line 7 (id 'two-tokens'): the prompt has 2 <|image|> tokens but 1 images",
    ]:
        assert message in err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "images": ["img/0.png"], "prompt": "x"}] * 2, "id 'a' repeats line 1; ids must be unique"),
        ([{"id": True, "images": ["img/0.png"], "prompt": "x"}], "'id' must be a string or an integer"),
        ([{"id": 1, "images": [], "prompt": "x"}], "'images' must be a non-empty list"),
        ([], "has no requests"),
    ],
)
def test_bad_requests_files(capsys, checkpoint_dir, requests, tmp_path, rows, message):
    write(requests, rows)
    code, _, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "answers.jsonl")
    assert code == 2 and message in err


def test_an_answers_file_of_other_requests_is_refused(capsys, checkpoint_dir, requests, tmp_path):
    out = tmp_path / "answers.jsonl"
    write(out, [{"id": "elsewhere", "answer": "x"}])
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    assert code == 2 and "answers id 'elsewhere', which is not in the requests" in err


def test_memory_budget_picks_the_batch_the_memory_model_allows(capsys, checkpoint_dir, requests, tmp_path, monkeypatch):
    """held + B (KV + inputs) + transient <= budget; this process's held and peak are fixed here (the
    subprocess test below checks them for real)."""
    from crosstrim.bench import measure

    held, transient = 1_000_000_000, 50_000_000
    monkeypatch.setattr(measure, "reset_peak", lambda device: held)
    monkeypatch.setattr(measure, "peak", lambda device: held + transient)  # calibration: one micro-batch's peak
    model, processor = checkpoint.load(checkpoint_dir, "cpu", "float32")
    mm = memory.MemoryModel.from_config(model.config)
    texts = [checkpoint.format_prompt(processor, r["prompt"], len(r["images"])) for r in read(requests)]
    text_tokens = max(len(processor.tokenizer(t)["input_ids"]) for t in texts) + 3

    def planned(*trim):
        code, _, err = run_batch(
            capsys,
            checkpoint_dir,
            requests,
            tmp_path / f"{''.join(trim)}.jsonl",
            "--memory-budget",
            repr(budget_gb),
            *trim,
        )
        assert code == 0, err
        return int(re.search(r"batch (\d+) from --memory-budget", err).group(1))

    # One request's inputs (the one with two images) and the calibration micro-batch's (one request) share.
    rows = read(requests)
    widest = max(rows, key=lambda r: len(r["images"]))
    pictures = tuple(checkpoint.load_image(requests.parent / path) for path in widest["images"])
    inputs = sum(t.nbytes for t in encode(processor, [Item("w", pictures, widest["prompt"], "", "")], "cpu").values())
    full = mm.kv_bytes("float32", text_tokens=text_tokens, images=2).total + inputs
    budget_gb = (held + transient - inputs + 3.5 * full) / 1e9  # the calibration's peak less its inputs: 3.5 fit

    def expected(r):
        per_request = mm.kv_bytes("float32", text_tokens=text_tokens, images=2, r=r).total + inputs
        return math.floor((budget_gb * 1e9 - held - (transient - inputs)) / per_request)

    assert planned("--keep-ratio", "1") == expected(1.0) == 3  # untrimmed: 3.5 requests (KV + inputs) fit
    assert planned("--k-ratio", "0.1") == 3  # the k_ratio share is unknown ahead: planned as keeping everything
    assert planned("--keep-ratio", "0.25") == expected(0.25) > 3

    code, _, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "x.jsonl", "--memory-budget", "0.0001")
    assert code == 2 and "holds no request: held" in err
    code, _, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "x.jsonl", "--memory-budget", "-1")
    assert code == 2 and "--memory-budget must be a positive number" in err
    code, _, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "x.jsonl", "--prefill-batch-size", "0")
    assert code == 2 and "--prefill-batch-size must be at least 1" in err


@needs_testbed_checkpoint
def test_without_model_it_answers_with_the_shipped_testbed(capsys, requests, tmp_path):
    out = tmp_path / "answers.jsonl"
    code, stdout, err = run_cli(
        capsys, "batch", "--requests", requests, "--out", out, "--device", "cpu", "--max-new-tokens", "2",
        "--keep-ratio", "0.5", "--prefill-batch-size", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "model: testbed; trimming: trimmed keep=0.5" in err
    assert [r["id"] for r in read(out)] == [f"r{i}" for i in range(5)] and "answered 5 of 5" in stdout


def test_memory_budget_keeps_the_peak_of_its_own_process_within_the_budget(tmp_path):
    """The promise itself: `crosstrim batch --memory-budget` in a fresh process, default allocator, a budget that
    binds (about 8 of 16 requests), and the process's peak resident set stays within it. A model with a
    1028-token image (4 tiles of 224 px) makes every request's KV and pixels megabytes, not allocator noise."""
    import subprocess
    import sys

    from crosstrim import tiny

    model, processor = tiny.random_model(seed=0, image_size=224, patch_size=14, text_hidden=512, heads=8, kv_heads=8)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(16):
        rng = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 255, (448, 448, 3), generator=rng, dtype=torch.uint8).numpy()
        __import__("PIL.Image").Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": f"r{i}", "images": [f"img/{i}.png"], "prompt": "<|image|> what is the color ?"})
    write(tmp_path / "requests.jsonl", rows)
    wrapper = (
        "import re, sys, pathlib; from crosstrim.cli import main; code = main(sys.argv[1:]); "
        "status = pathlib.Path('/proc/self/status').read_text(); "
        "print('VmHWM', int(re.search(r'VmHWM:\\s+(\\d+) kB', status)[1]) * 1024, file=sys.stderr); sys.exit(code)"
    )

    def run(budget_gb: float, out: str):
        argv = ["batch", "--model", tmp_path / "model", "--requests", tmp_path / "requests.jsonl", "--out"]
        argv += [tmp_path / out, "--device", "cpu", "--max-new-tokens", "3", "--keep-ratio", "0.25"]
        argv += ["--memory-budget", repr(budget_gb)]
        done = subprocess.run(
            [sys.executable, "-c", wrapper, *map(str, argv)],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        plan = re.search(
            r"batch (\d+) from .*: held ([\d.]+) GB \+ B x \(([\d.]+) MB KV \+ ([\d.]+) MB inputs\) \+ transient "
            r"([\d.]+) GB \(predicted peak ([\d.]+) GB",
            done.stderr,
        )
        peak = int(re.search(r"VmHWM (\d+)", done.stderr)[1])
        return int(plan[1]), float(plan[2]) * 1e9, (float(plan[3]) + float(plan[4])) * 1e6, float(plan[5]) * 1e9, peak

    _, held, per_request, transient, _ = run(100.0, "probe.jsonl")  # every request fits: read the terms
    budget = held + transient + 8.9 * per_request  # 8 requests, 0.9 of one (8 MB) left for what the model misses
    batch, _, _, _, peak = run(budget / 1e9, "answers.jsonl")
    assert 6 <= batch <= 10 < 16  # the budget binds
    assert len(read(tmp_path / "answers.jsonl")) == 16
    print(f"budget {budget / 1e9:.3f} GB, batch {batch}, peak {peak / 1e9:.3f} GB ({peak / budget:.1%} of the budget)")
    assert peak <= budget
