"""`crosstrim batch` on a tiny checkpoint: answers, resume after an interruption, bad rows, memory budget."""

import errno
import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

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
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    # Ctrl-C: one line saying what is kept and how to go on, exit 130 (128 + SIGINT), no traceback.
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"crosstrim batch: interrupted; 2 of 5 requests are answered in {out}; "
        "run the same command again to answer the rest"
    )
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
        "requests.jsonl line 6 (id 'broken'): cannot read image",  # every message names the file
        "line 7 (id 'two-tokens'): the prompt has 2 <|image|> tokens but 1 image was given",
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
    # Numbers that explain: each in the unit that fits it, never rounded to zero (issue 19, item 12).
    assert re.search(
        r"held [1-9][\d.]* [KMG]?B \+ B x \([1-9][\d.]* [KMG]?B KV \+ [1-9][\d.]* [KMG]?B inputs\)", err
    ), err
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
    # Three prompts use words the testbed cannot read: one warning, naming the first and the vocabulary.
    assert (
        "crosstrim batch: warning: 3 requests use words the testbed does not know; requests.jsonl line 3 (id 'r2'): "
        "the testbed does not know 'describe', 'it' (each reads as <|unk|>)" in err
    )
    assert "crosstrim.testbed.data.vocabulary()" in err
    assert [r["id"] for r in read(out)] == [f"r{i}" for i in range(5)] and "answered 5 of 5" in stdout


# -- issue 19: never mixes, duplicates or loses answers ------------------------------------------------


def answered(checkpoint_dir, requests, out, capsys, *extra):
    """Run to the end and return the answer rows (a reference to compare a resumed run with)."""
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2", *extra)
    assert code == 0, err
    return read(out)


def resume_from(reference, out, lines: int, *, newline: bool = True):
    """``out`` as a run that stopped after ``lines`` answers of ``reference`` left it (settings included)."""
    text = "".join(line + "\n" for line in reference.read_text().splitlines()[:lines])
    out.write_text(text if newline else text[:-1])
    settings = reference.with_name(reference.name + ".settings.json")
    out.with_name(out.name + ".settings.json").write_text(settings.read_text())


def test_a_second_run_on_the_same_out_is_refused_while_another_holds_it(capsys, checkpoint_dir, requests, tmp_path):
    out = tmp_path / "answers.jsonl"
    lock = tmp_path / "answers.jsonl.lock"
    holder = subprocess.Popen(  # another process holding the lock, as a running `crosstrim batch` does
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"another crosstrim batch is writing '{out}' (it holds '{lock}')" in err
    assert not out.exists()  # refused before anything was written
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)  # the lock went with its process
    assert code == 0, err
    assert [r["id"] for r in read(out)] == [f"r{i}" for i in range(5)]


HOLD_LOCK = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"  # noqa: E501


@pytest.mark.parametrize("twin", ["r0", 0])
def test_an_id_answered_twice_is_refused(capsys, checkpoint_dir, requests, tmp_path, twin):
    """Two runs that both wrote into one file (before the lock existed) leave ids twice: refuse to count them.
    An integer id and its string are one id (JSON answers round-trip through text)."""
    if twin == 0:
        write(requests, [{**row, "id": i} for i, row in enumerate(read(requests))])
    reference = tmp_path / "reference.jsonl"
    rows = answered(checkpoint_dir, requests, reference, capsys)
    out = tmp_path / "answers.jsonl"
    resume_from(reference, out, 2)
    with out.open("a") as sink:
        sink.write(json.dumps({**rows[0], "id": "0" if twin == 0 else "r0"}) + "\n")
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    assert code == 2 and f"line 3 answers id {'0' if twin == 0 else 'r0'!r} again" in err


def test_ids_7_and_the_string_7_are_one_id(capsys, checkpoint_dir, requests, tmp_path):
    row = read(requests)[0]
    write(requests, [{**row, "id": 7}, {**row, "id": "7"}])
    code, _, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "answers.jsonl")
    assert code == 2 and "line 2: id '7' repeats line 1; ids must be unique" in err


def test_a_resume_with_other_settings_is_refused_naming_the_difference(capsys, checkpoint_dir, requests, tmp_path):
    out = tmp_path / "answers.jsonl"
    first = answered(checkpoint_dir, requests, out, capsys, "--k-ratio", "0.05")
    settings = json.loads((tmp_path / "answers.jsonl.settings.json").read_text())
    assert settings["model"] == str(checkpoint_dir.resolve()) and settings["dtype"] == "float32"
    assert settings["trimming"]["k_ratio"] == 0.05 and settings["generate"]["max_new_tokens"] == 3
    assert settings["crosstrim"] == crosstrim.__version__ and len(settings["model files"]) == 16

    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--keep-ratio", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "holds answers made with other settings (trimming k_ratio 0.05 -> None; trimming keep_ratio None -> 1.0)" in err
    )
    assert "answer into a new --out" in err
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--k-ratio", "0.05", "--max-new-tokens", "4")
    assert code == 2 and "generate max_new_tokens 3 -> 4" in err
    assert read(out) == first  # nothing mixed in
    # What only changes the speed is no difference: the batch size, the prefill micro-batch.
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out, "--k-ratio", "0.05", "--batch-size", "5")
    assert code == 0 and "answered 5 of 5" in stdout, err
    # Answers whose settings are not recorded (an older crosstrim wrote them) are not resumed either.
    (tmp_path / "answers.jsonl.settings.json").unlink()
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--k-ratio", "0.05")
    assert code == 2 and "no record of what produced them" in err


def test_out_that_is_the_requests_file_is_refused(capsys, checkpoint_dir, requests, tmp_path, monkeypatch):
    before = requests.read_text()
    (tmp_path / "link.jsonl").symlink_to(requests)
    monkeypatch.chdir(tmp_path)
    for out in (requests, tmp_path / "link.jsonl", "requests.jsonl", "./img/../requests.jsonl"):
        code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out)
        assert code == 2 and "is the requests file" in err and not stdout, (out, err)
    assert requests.read_text() == before
    # A copy of the requests is no answers file: its rows have no answer.
    (tmp_path / "copy.jsonl").write_text(before)
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, tmp_path / "copy.jsonl")
    assert code == 2 and "copy.jsonl line 1 is not an answer row" in err


def test_a_failure_while_repairing_the_last_line_keeps_every_stored_answer(
    capsys, checkpoint_dir, requests, tmp_path, monkeypatch
):
    reference = tmp_path / "reference.jsonl"
    answered(checkpoint_dir, requests, reference, capsys)
    out = tmp_path / "answers.jsonl"
    resume_from(reference, out, 4)
    kept = out.read_text()
    with out.open("a") as sink:
        sink.write(reference.read_text().splitlines()[4][:10])  # killed mid-write

    def fail(*args, **kwargs):  # the disk fails during the repair, after writing half of what it was given
        if len(args) > 1 and isinstance(args[1], bytes):
            with open(args[0], "wb") as sink:
                sink.write(args[1][: len(args[1]) // 2])
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "truncate", fail)
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: fail(self, data))
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    assert code == 2 and "cannot repair the last line" in err and "Input/output error" in err
    assert out.read_text().startswith(kept)  # every stored answer is still there
    monkeypatch.undo()
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 0 and read(out) == read(reference), err


def test_a_complete_last_line_without_its_newline_counts_as_answered(capsys, checkpoint_dir, requests, tmp_path):
    reference = tmp_path / "reference.jsonl"
    answered(checkpoint_dir, requests, reference, capsys)
    out = tmp_path / "answers.jsonl"
    resume_from(reference, out, 2, newline=False)
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 0, err
    assert "3 to answer (2 already in" in err and "dropped" not in err
    assert read(out) == read(reference)


def test_every_batch_is_on_disk_before_the_next_starts(capsys, checkpoint_dir, requests, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(out):
            synced.append(len(out.read_text().splitlines()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 0, err
    assert synced == [2, 4, 5]  # once per batch, after its answers


@pytest.mark.parametrize("where", ["folder", "under a file", "unwritable folder", "unwritable file"])
def test_out_problems_are_one_line_before_the_model_loads(
    capsys, checkpoint_dir, requests, tmp_path, monkeypatch, where
):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "readonly.jsonl").write_text("")
    (tmp_path / "readonly.jsonl").chmod(0o444)
    out, message = {
        "folder": (tmp_path / "folder", "is a folder; pass a file path"),
        "under a file": (tmp_path / "file.txt" / "answers.jsonl", "lies under a file, not a folder"),
        "unwritable folder": (Path("/sys/crosstrim-answers.jsonl"), "cannot write in the folder of --out"),
        "unwritable file": (tmp_path / "readonly.jsonl", "cannot write --out"),
    }[where]
    if where == "unwritable file" and os.geteuid() == 0:  # root writes read-only files: fail as a user would
        real_open = Path.open

        def refuse(self, mode="r", *args, **kwargs):
            if self == out and "a" in mode:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    monkeypatch.setattr(
        batch_tool, "load_model", lambda *args: pytest.fail("the model loaded before --out was checked")
    )
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_file_size_limit_mid_write_keeps_the_answers_before(capsys, checkpoint_dir, requests, tmp_path):
    reference = tmp_path / "reference.jsonl"
    answered(checkpoint_dir, requests, reference, capsys)
    out = tmp_path / "answers.jsonl"
    resume_from(reference, out, 2)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (out.stat().st_size + 30, limits[1]))  # the next batch stops mid-line
    try:
        code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert code == 2 and "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"crosstrim batch: error: cannot write answers to '{out}': File too large")
    )
    assert "the 2 answers before are kept" in err
    assert out.read_text().startswith("".join(line + "\n" for line in reference.read_text().splitlines()[:2]))
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 0 and "dropped an incomplete last line" in err
    assert read(out) == read(reference)


def test_an_image_over_the_decompression_bomb_limit_is_a_bad_row(
    capsys, checkpoint_dir, requests, tmp_path, monkeypatch
):
    from PIL import Image

    Image.new("RGB", (200, 200)).save(tmp_path / "img" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 40,000 pixels: over twice the limit
    rows = read(requests)
    write(requests, [*rows[:2], {"id": "bomb", "images": ["img/bomb.png"], "prompt": "what ?"}, *rows[2:]])
    out = tmp_path / "answers.jsonl"
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("crosstrim batch: error: requests.jsonl line 3 (id 'bomb'): cannot")
    assert "line 3 (id 'bomb'): cannot read image" in err and "bomb.png" in err and "decompression bomb" in err
    assert [r["id"] for r in read(out)] == ["r0", "r1"]
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out, "--batch-size", "2", "--skip-bad")
    assert code == 0 and "answered 5 of 6" in stdout and "skipped 1 bad row" in err and "bomb.png" in err


def test_a_prompt_longer_than_the_model_s_positions_is_a_bad_row(capsys, checkpoint_dir, requests, tmp_path):
    rows = read(requests)
    positions = 512  # tiny.py: text_config.max_position_embeddings
    write(requests, [*rows, {"id": "long", "images": ["img/0.png"], "prompt": "what " * positions}])
    out = tmp_path / "answers.jsonl"
    code, _, err = run_batch(capsys, checkpoint_dir, requests, out)
    # <|image|> and one token a word (the tiny tokenizer adds no BOS), plus --max-new-tokens 3
    assert code == 2 and f"line 6 (id 'long'): the prompt is {positions + 1} tokens" in err
    assert f"needs {positions + 4} positions; the model has {positions} (max_position_embeddings)" in err
    code, stdout, err = run_batch(capsys, checkpoint_dir, requests, out, "--skip-bad")
    assert code == 0 and "answered 5 of 6" in stdout and "id 'long'" in err


def test_the_memory_budget_plan_counts_the_summary_tokens(capsys, checkpoint_dir, requests, tmp_path, monkeypatch):
    """--summarize-dropped caches one more token per image in every trimmed layer: a budget of exactly four
    requests without it holds three with it."""
    from crosstrim.bench import measure

    held, transient = 1_000_000_000, 50_000_000  # this process's held and calibration peak, fixed
    monkeypatch.setattr(measure, "reset_peak", lambda device: held)
    monkeypatch.setattr(measure, "peak", lambda device: held + transient)
    model, processor = checkpoint.load(checkpoint_dir, "cpu", "float32")
    mm = memory.MemoryModel.from_config(model.config)
    rows = read(requests)
    texts = [checkpoint.format_prompt(processor, r["prompt"], len(r["images"])) for r in rows]
    text_tokens = max(len(processor.tokenizer(t)["input_ids"]) for t in texts) + 3
    widest = max(rows, key=lambda r: len(r["images"]))
    pictures = tuple(checkpoint.load_image(requests.parent / path) for path in widest["images"])
    inputs = sum(t.nbytes for t in encode(processor, [Item("w", pictures, widest["prompt"], "", "")], "cpu").values())
    plain = mm.kv_bytes("float32", text_tokens=text_tokens, images=2, r=0.25).total + inputs
    summarised = plain + 2 * mm.trimmed_layers() * mm.kv_bytes_per_token("float32")
    fixed = held + transient - inputs  # held, and the calibration micro-batch's peak less its one request's inputs
    budget = fixed + 4 * plain + 1
    code, _, err = run_batch(
        capsys, checkpoint_dir, requests, tmp_path / "answers.jsonl", "--memory-budget", repr(budget / 1e9),
        "--keep-ratio", "0.25", "--summarize-dropped",
    )  # fmt: skip
    assert code == 0, err
    assert int(re.search(r"batch (\d+) from --memory-budget", err).group(1)) == (budget - fixed) // summarised == 3


def test_a_resume_with_a_changed_model_folder_is_refused(capsys, checkpoint_dir, requests, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoint_dir, model)
    out = tmp_path / "answers.jsonl"
    assert run_batch(capsys, model, requests, out, "--batch-size", "5")[0] == 0
    (model / ".cache").mkdir()  # what a download tool leaves: not the model
    (model / ".cache" / "x.lock").write_text("")
    assert run_batch(capsys, model, requests, out)[0] == 0
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.5}))
    code, _, err = run_batch(capsys, model, requests, out)
    assert code == 2 and "holds answers made with other settings (model files " in err


def parse_bytes(text: str) -> float:
    """``'52.22 MB'`` -> 52.22e6: the inverse of ``memory.format_bytes`` (four significant digits)."""
    number, unit = text.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


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
        size = r"([\d.]+ [KMG]?B)"
        plan = re.search(
            rf"batch (\d+) from .*: held {size} \+ B x \({size} KV \+ {size} inputs\) \+ transient {size} "
            rf"\(predicted peak {size}",
            done.stderr,
        )
        peak = int(re.search(r"VmHWM (\d+)", done.stderr)[1])
        held, kv, inputs, transient = (parse_bytes(plan[i]) for i in range(2, 6))
        return int(plan[1]), held, kv + inputs, transient, peak

    _, held, per_request, transient, _ = run(100.0, "probe.jsonl")  # every request fits: read the terms
    budget = held + transient + 8.9 * per_request  # 8 requests, 0.9 of one (8 MB) left for what the model misses
    batch, _, _, _, peak = run(budget / 1e9, "answers.jsonl")
    assert 6 <= batch <= 10 < 16  # the budget binds
    assert len(read(tmp_path / "answers.jsonl")) == 16
    print(f"budget {budget / 1e9:.3f} GB, batch {batch}, peak {peak / 1e9:.3f} GB ({peak / budget:.1%} of the budget)")
    assert peak <= budget
