"""`crosstrim generate` end to end on a tiny checkpoint the test saves (model + offline processor)."""

import json

import pytest
from support import image, needs_testbed_checkpoint, run_cli


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    image(2, seed=1).save(path)
    return path


def test_generate_prints_answer_stats_and_comparison(capsys, checkpoint_dir, image_file):
    code, out, err = run_cli(
        capsys, "generate", "--model", checkpoint_dir, "--image", image_file, "--prompt", "what is it ?",
        "--k-ratio", "0.1", "--max-new-tokens", "4", "--compare", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "answer (trimmed k=0.1):" in out and "answer (full):" in out
    assert "kept" in out and "MB ->" in out
    assert ("same answer" in out) != ("answers differ" in out)


def test_generate_accepts_baselines_and_explicit_image_tokens(capsys, checkpoint_dir, image_file):
    code, out, err = run_cli(
        capsys, "generate", "--model", checkpoint_dir, "--image", image_file, "--image", image_file,
        "--prompt", "<|image|> left <|image|> right ?", "--method", "uniform", "--keep-ratio", "0.5",
        "--max-new-tokens", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "uniform keep=0.5: kept 5" in out  # exactly ceil(0.5 * 34) = 17 of 34 per image -> 50.0%


def test_generate_summarize_dropped_and_its_one_conflict(capsys, checkpoint_dir, image_file):
    common = ["generate", "--model", checkpoint_dir, "--image", image_file, "--prompt", "what ?", "--device", "cpu"]
    code, out, err = run_cli(capsys, *common, "--max-new-tokens", "2", "--summarize-dropped")
    assert code == 0, err
    assert "answer (trimmed k=0.25 +summary):" in out
    code, _, err = run_cli(capsys, *common, "--summarize-dropped", "--trim-first-layer-cache")
    assert code == 2 and "turn --trim-first-layer-cache off" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{missing}"], "does not exist"),
        (["--model", "{not_mllama}"], "'llama' model"),
        (["--model", "{empty}"], "no config.json"),
        (["--image", "{bad_image}"], "cannot read image"),
        (["--image", "{missing_image}"], "does not exist"),
        (["--no-image"], "no image"),
        (["--k-ratio", "1.5"], "--k-ratio must be in (0, 1], got 1.5"),
        (["--k-ratio", "abc"], "--k-ratio must be a number, got 'abc'"),
        (["--seed", "1.5"], "--seed must be a whole number, got '1.5'"),
        (["--method", "random"], "--method='random' needs --keep-ratio"),
        (["--prompt", "<|image|> <|image|> two ?"], "2 <|image|> tokens but 1 images"),
        (["--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero_exit(capsys, tmp_path, checkpoint_dir, image_file, argv, message):
    (tmp_path / "not_mllama").mkdir()
    (tmp_path / "not_mllama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_text("not an image")
    places = {
        "missing": tmp_path / "nope",
        "not_mllama": tmp_path / "not_mllama",
        "empty": tmp_path / "empty",
        "bad_image": tmp_path / "bad.png",
        "missing_image": tmp_path / "nope.png",
    }
    args = {"--model": str(checkpoint_dir), "--image": str(image_file), "--prompt": "what ?"}
    if argv == ["--no-image"]:
        del args["--image"]
        argv = []
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.format(**{k: str(v) for k, v in places.items()})
    flat = ["generate", "--max-new-tokens", "2"] + [x for pair in args.items() for x in pair]
    if "--device" not in args:
        flat += ["--device", "cpu"]
    code, _, err = run_cli(capsys, *flat)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# -- one consistent CLI (issue 14) -------------------------------------------------------------------


def test_version(capsys):
    import crosstrim

    with pytest.raises(SystemExit) as done:
        run_cli(capsys, "--version")
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"crosstrim {crosstrim.__version__}"


@pytest.mark.parametrize("command", ["generate", "eval", "viz", "demo"])
def test_every_model_command_has_threads_dtype_and_a_testbed_default(capsys, command):
    with pytest.raises(SystemExit):
        run_cli(capsys, command, "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads N" in text and "default: the built-in testbed" in text
    assert "fp32/float32, bf16/bfloat16, fp16/float16" in text


@needs_testbed_checkpoint
def test_generate_defaults_to_the_testbed_and_sets_threads(capsys, tmp_path):
    import torch

    from crosstrim.testbed import data

    item = data.heldout(1)[0]
    item.images[0].save(tmp_path / "scene.png")
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(
            capsys, "generate", "--image", tmp_path / "scene.png", "--prompt", item.prompt, "--max-new-tokens", "1",
            "--device", "cpu", "--threads", str(threads + 1), "--dtype", "fp32",
        )  # fmt: skip
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "model: testbed" in out and f"answer (trimmed k=0.25): {item.answer}" in out


@pytest.mark.parametrize("spelling", ["fp32", "float32", "FP32", "auto"])
def test_generate_accepts_every_dtype_spelling(capsys, checkpoint_dir, image_file, spelling):
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint_dir, "--image", image_file, "--prompt", "what ?",
        "--max-new-tokens", "1", "--device", "cpu", "--dtype", spelling,
    )  # fmt: skip
    assert code == 0, err


def test_dtype_spellings_resolve_alike():
    import torch

    from crosstrim.evaluation import UserError, checkpoint

    cpu = torch.device("cpu")
    assert {checkpoint.resolve_dtype(n, cpu) for n in ("fp32", "float32", "FP32", "auto")} == {torch.float32}
    assert {checkpoint.resolve_dtype(n, cpu) for n in ("bf16", "bfloat16")} == {torch.bfloat16}
    assert checkpoint.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(UserError, match="unknown --dtype 'fp64'"):
        checkpoint.resolve_dtype("fp64", cpu)


def test_ratio_one_keeps_100_percent_and_says_why_it_saves_no_cache(capsys, checkpoint_dir, image_file):
    """The 2-tile image has 34 valid tokens in 4 x 17 slots: ratio 1.0 keeps 34/34 (not 68/34 = 200%)
    and caches every slot; 0.999 keeps the same 34 tokens but drops the padding tiles from the cache."""
    common = ["generate", "--model", checkpoint_dir, "--image", image_file, "--prompt", "what ?", "--device", "cpu"]
    code, out, err = run_cli(capsys, *common, "--max-new-tokens", "1", "--k-ratio", "1")
    assert code == 0, err
    assert "kept 100.0% of image tokens (per sample 34/34)" in out and "ratio 1 is the identity" in out
    full = out.split("cross-attn KV ")[1].split()
    assert full[0] == full[3]  # "X MB -> X MB": nothing saved
    code, out, err = run_cli(capsys, *common, "--max-new-tokens", "1", "--k-ratio", "0.999")
    assert code == 0, err
    assert "kept 100.0% of image tokens (per sample 34/34)" in out and "ratio 1 is the identity" not in out
    kv = out.split("cross-attn KV ")[1].split()
    assert float(kv[3]) < float(kv[0])


def test_kv_units_scale_and_output_goes_to_a_run_folder(capsys, tmp_path, monkeypatch, model):
    model.config.save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "kv", "--model", tmp_path / "tiny", "--dtype", "float32")
    assert code == 0, err
    assert "0.000" not in out and "(0.1 MB)" not in out
    assert "(a) KV cache vs batch size, MB," in out and "KB)" in out
    assert (tmp_path / "runs" / "kv" / "kv-tiny-float32.json").is_file()
    assert not (tmp_path / "benchmarks").exists()
    code, out, err = run_cli(capsys, "kv", "--no-plot")  # the 11B preset: GB at batch 64
    assert code == 0, err
    assert "(a) KV cache vs batch size, GB," in out and "(209.8 MB)" in out


def test_kv_accepts_the_shared_dtype_spellings(capsys):
    for spelling, shown in [("auto", "bf16, 2"), ("bf16", "bf16, 2"), ("bfloat16", "bfloat16, 2"), ("fp32", "fp32, 4")]:
        code, out, err = run_cli(capsys, "kv", "--no-plot", "--dtype", spelling)
        assert code == 0, err
        assert f"({shown} B/element)" in out


def test_the_testbed_on_transformers_4_is_a_clear_error(capsys, monkeypatch, tmp_path):
    """The shipped testbed's tokenizer files need transformers 5: say so, not an AttributeError from inside it."""
    import transformers

    image(1, 0).save(tmp_path / "x.png")
    monkeypatch.setattr(transformers, "__version__", "4.57.3")
    code, _, err = run_cli(
        capsys, "generate", "--image", tmp_path / "x.png", "--prompt", "what color is the circle ?"
    )  # fmt: skip
    assert code == 2 and "transformers 4.57.3 cannot read them; upgrade transformers or pass --model DIR" in err


def test_loading_a_checkpoint_leaves_transformers_progress_bars_as_the_caller_had_them(checkpoint_dir):
    from transformers.utils import logging as hf_logging

    from crosstrim.evaluation import checkpoint

    try:
        for enabled in (True, False):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            checkpoint.load(checkpoint_dir, "cpu")
            assert hf_logging.is_progress_bar_enabled() is enabled
    finally:
        hf_logging.enable_progress_bar()
