"""`crosstrim generate` end to end on a tiny checkpoint the test saves (model + offline processor)."""

import json

import pytest
from support import image, run_cli


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
    assert code == 2 and "set --trim-first-layer-cache=False" in err and len(err.strip().splitlines()) == 1


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
