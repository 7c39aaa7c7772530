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


def test_memory_budget_picks_the_batch_the_memory_model_allows(capsys, checkpoint_dir, requests, tmp_path):
    model, processor = checkpoint.load(checkpoint_dir, "cpu", "float32")
    mm = memory.MemoryModel.from_config(model.config)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    texts = [checkpoint.format_prompt(processor, r["prompt"], len(r["images"])) for r in read(requests)]
    text_tokens = max(len(processor.tokenizer(t)["input_ids"]) for t in texts) + 3
    budget_gb = (weights + 3.5 * mm.kv_bytes("float32", text_tokens=text_tokens, images=2).total) / 1e9

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

    assert planned("--keep-ratio", "1") == 3  # untrimmed: 3.5 requests' KV fit
    assert planned("--k-ratio", "0.1") == 3  # the k_ratio share is unknown ahead: planned as keeping everything
    per_request = mm.kv_bytes("float32", text_tokens=text_tokens, images=2, r=0.25).total
    assert planned("--keep-ratio", "0.25") == math.floor((budget_gb * 1e9 - weights) / per_request) > 3

    code, _, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "x.jsonl", "--memory-budget", "0.0001")
    assert code == 2 and "holds no request: weights" in err
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
