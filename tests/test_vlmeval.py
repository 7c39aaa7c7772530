"""VLMEvalKit TSVs: reading each benchmark's layout, prompts, answer extraction, official metrics, bad rows."""

import base64
import json

import numpy as np
import pytest
from PIL import Image
from support import run_cli

from crosstrim.evaluation import UserError, distributed, sources, vlmeval_metrics, vlmeval_tsv
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import Prediction, predict


def picture(seed: int, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def mme_rows():
    """Two perception pairs and one cognition pair; second questions refer to the first row's image."""
    rows = []
    for pair, category in enumerate(["existence", "existence", "code_reasoning"]):
        first, second = 2 * pair + 1, 2 * pair + 2
        path = f"{category}/{pair}.png"
        rows.append(
            {"index": first, "image": picture(pair), "question": f"Is there a cat {pair}? Please answer yes or no.",
             "answer": "Yes", "category": category, "image_path": path}
        )  # fmt: skip
        rows.append(
            {"index": second, "image": str(first), "question": f"Is there a dog {pair}? Please answer yes or no.",
             "answer": "No", "category": category, "image_path": path}
        )  # fmt: skip
    return rows


def pope_rows():
    answers = ["Yes", "No", "Yes", "No", "Yes", "No"]
    categories = ["adversarial", "adversarial", "popular", "popular", "random,popular", "random"]
    return [
        {"index": i, "image": picture(10 + i), "question": f"Is there a car {i} in the image?", "answer": a,
         "category": c}
        for i, (a, c) in enumerate(zip(answers, categories))
    ]  # fmt: skip


def seed_rows():
    return [
        {"index": 100 + i, "image": picture(20 + i), "question": f"What is shown {i}?", "A": "a cat", "B": "a dog",
         "C": "a red car", "D": "a tree", "answer": "ABCD"[i % 4], "category": ["Scene", "Instance"][i % 2]}
        for i in range(4)
    ]  # fmt: skip


def mmvp_rows():
    return [
        {"index": i, "image": picture(30 + i), "question": "Is the dog facing left or right?",
         "A": "Left", "B": "Right", "answer": "AB"[(i - 1) % 2], "category": "orientation"}
        for i in range(1, 5)
    ]  # fmt: skip


@pytest.fixture
def files(tmp_path):
    return {
        name: vlmeval_tsv.write_tsv(tmp_path / f"{name}.tsv", rows())
        for name, rows in [("MME", mme_rows), ("POPE", pope_rows), ("SEEDBench_IMG", seed_rows), ("MMVP", mmvp_rows)]
    }


# -- reading ---------------------------------------------------------------------------------------


def test_mme_rows_become_items_sharing_their_pair_image(files):
    data = vlmeval_tsv.load_tsv(files["MME"])
    assert (data.benchmark, data.kind, data.skipped) == ("MME", "yorn", [])
    items = data.items
    assert [item.id for item in items] == [str(i) for i in range(1, 7)]
    assert items[0].prompt == "Is there a cat 0? Please answer yes or no."  # Y/N prompt: the question alone
    assert [item.answer for item in items[:2]] == ["Yes", "No"]
    assert items[1].images[0] is items[0].images[0]  # a reference reuses the row's decoded image
    assert same_pixels(items[1].images[0], picture(0))
    assert not same_pixels(items[2].images[0], picture(0))
    assert items[4].category == "code_reasoning"
    assert items[0].extra["image_source"] == items[1].extra["image_source"] == "index 1"


def test_mcq_rows_get_the_standard_option_prompt(files):
    data = vlmeval_tsv.load_tsv(files["SEEDBench_IMG"])
    assert (data.benchmark, data.kind) == ("SEEDBench_IMG", "mcq")
    item = data.items[0]
    assert item.prompt == (
        "Question: What is shown 0?\nOptions:\nA. a cat\nB. a dog\nC. a red car\nD. a tree\n"
        "Please select the correct answer from the options above. \n"
    )
    assert item.extra["options"] == {"A": "a cat", "B": "a dog", "C": "a red car", "D": "a tree"}
    assert same_pixels(item.images[0], picture(20))
    mmvp = vlmeval_tsv.load_tsv(files["MMVP"]).items[0]
    assert mmvp.prompt.endswith(
        "Options:\nA. Left\nB. Right\nPlease select the correct answer from the options above. \n"
    )


def test_hint_missing_options_and_list_images(tmp_path):
    rows = [
        {"index": 1, "image": [picture(1), picture(2)], "question": "Which?", "hint": "Look twice.", "A": "x",
         "B": "y", "C": "", "answer": "b"},
    ]  # fmt: skip
    item = vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "quiz.tsv", rows)).items[0]
    assert item.prompt.startswith("Hint: Look twice.\nQuestion: Which?\nOptions:\nA. x\nB. y\nPlease")
    assert item.answer == "B" and item.extra["options"] == {"A": "x", "B": "y"}  # empty C is no option
    assert len(item.images) == 2 and same_pixels(item.images[1], picture(2))


def test_image_path_files_relative_to_the_tsv(tmp_path):
    (tmp_path / "img").mkdir()
    picture(5).save(tmp_path / "img" / "a.png")
    rows = [{"index": 1, "image_path": "img/a.png", "question": "Is it red?", "answer": "no"}]
    data = vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "custom.tsv", rows))
    assert data.benchmark == "YORN" and data.items[0].answer == "No"
    assert same_pixels(data.items[0].images[0], picture(5))


def test_benchmark_recognised_by_name_columns_or_argument(tmp_path, files):
    assert vlmeval_tsv.load_tsv(files["POPE"]).benchmark == "POPE"
    local = vlmeval_tsv.write_tsv(tmp_path / "MMVP_local.tsv", mmvp_rows())
    assert vlmeval_tsv.load_tsv(local).benchmark == "MMVP"
    other = vlmeval_tsv.write_tsv(tmp_path / "other.tsv", seed_rows())
    assert vlmeval_tsv.load_tsv(other).benchmark == "MCQ"
    assert vlmeval_tsv.load_tsv(other, benchmark="mmvp").benchmark == "MMVP"
    with pytest.raises(UserError, match="unknown benchmark 'GQA'"):
        vlmeval_tsv.load_tsv(other, benchmark="GQA")
    open_ended = vlmeval_tsv.write_tsv(tmp_path / "vqa.tsv", [{"index": 1, "image": picture(1), "question": "Q?",
                                                            "answer": "red"}])  # fmt: skip
    with pytest.raises(UserError, match=r"cannot tell which benchmark vqa\.tsv holds"):
        vlmeval_tsv.load_tsv(open_ended)


def test_tsv_items_predict_like_the_original_images(model, processor, files):
    """Images stay encoded until answered; the model sees exactly the pixels that were written."""
    items = vlmeval_tsv.load_tsv(files["POPE"]).items[:3]
    originals = [Item(i.id, (picture(10 + k),), i.prompt, i.answer, i.category) for k, i in enumerate(items)]
    assert predict(model, processor, items, max_new_tokens=3, batch_size=3) == predict(
        model, processor, originals, max_new_tokens=3, batch_size=3
    )


# -- bad input -------------------------------------------------------------------------------------


def test_missing_columns_name_the_column(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in pope_rows()]
    with pytest.raises(UserError, match=r"POPE.tsv has no 'answer' column"):
        vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "POPE.tsv", rows))
    rows = [{k: v for k, v in row.items() if k != "B"} for row in seed_rows()]
    with pytest.raises(UserError, match=r"SEEDBench_IMG.tsv has no 'B' column"):
        vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "SEEDBench_IMG.tsv", rows), skip_bad=True)
    rows = [{k: v for k, v in row.items() if k != "image"} for row in pope_rows()]
    with pytest.raises(UserError, match=r"no 'image \(or image_path\)' column"):
        vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "POPE.tsv", rows))
    with pytest.raises(UserError, match="does not exist"):
        vlmeval_tsv.load_tsv(tmp_path / "nothing.tsv")


BAD_ROWS = {
    "not base64": ({"image": "%%%% not base64 at all, this is a long enough string to be no reference"},
                   "image is not valid base64"),
    "not an image": ({"image": base64.b64encode(b"GIF89a" + bytes(200)).decode()}, "image is not a decodable image"),
    "truncated": ({"image": vlmeval_tsv.encode_image(picture(3, (64, 64)))[:400]}, "image is not a decodable image"),
    "dangling reference": ({"image": "999"}, "image refers to index '999', which no row has"),
    "no question": ({"question": ""}, "question is empty"),
    "bad answer": ({"answer": "Maybe"}, "answer 'Maybe' is not Yes or No"),
    "no index": ({"index": ""}, "index is empty"),
    "repeated index": ({"index": 0}, "index repeats an earlier row's"),
}  # fmt: skip


@pytest.mark.parametrize("change", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_is_an_error_naming_it_or_skipped_with_a_count(tmp_path, change):
    update, message = change
    rows = pope_rows()
    rows[2] = {**rows[2], **update}
    path = vlmeval_tsv.write_tsv(tmp_path / "POPE.tsv", rows)
    index = rows[2]["index"]
    where = "POPE.tsv row 3 (line 4" + (f", index {index})" if index != "" else ")")
    with pytest.raises(UserError) as err:
        vlmeval_tsv.load_tsv(path)
    assert str(err.value).startswith(f"{where}: {message}")
    assert "--skip-bad" in str(err.value) and "skip_bad=True" in str(err.value)
    data = vlmeval_tsv.load_tsv(path, skip_bad=True)
    assert len(data.items) == 5 and [(s.where, s.index) for s in data.skipped] == [(where, str(index))]
    assert data.skipped[0].reason.startswith(message) and str(data.skipped[0]).startswith(f"{where}: {message}")


def test_truncated_images_are_caught_even_when_pil_is_told_to_accept_them(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as importing lmms-eval does
    rows = pope_rows()
    rows[1]["image"] = vlmeval_tsv.encode_image(picture(3, (64, 64)))[:400]
    with pytest.raises(UserError, match=r"row 2 \(line 3, index 1\): image is not a decodable image"):
        vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "POPE.tsv", rows))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_field_count_and_mcq_answer_errors(tmp_path):
    path = vlmeval_tsv.write_tsv(tmp_path / "MMVP.tsv", mmvp_rows())
    lines = path.read_text().splitlines()
    lines[2] += "\textra"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"MMVP.tsv row 2 \(line 3\): has 8 tab-separated fields, the header has 7"):
        vlmeval_tsv.load_tsv(path)
    rows = mmvp_rows()
    rows[0]["answer"] = "C"
    path = vlmeval_tsv.write_tsv(tmp_path / "MMVP.tsv", rows)
    with pytest.raises(UserError, match=r"row 1 \(line 2, index 1\): answer 'C' is not one of its options A, B"):
        vlmeval_tsv.load_tsv(path)
    rows = [{**row, "image": "bad"} for row in mmvp_rows()]
    with pytest.raises(UserError, match=r"MMVP.tsv has no usable rows \(4 skipped\)"):
        vlmeval_tsv.load_tsv(vlmeval_tsv.write_tsv(tmp_path / "MMVP.tsv", rows), skip_bad=True)


# -- extraction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes", "Yes"), ("no.", "No"), ("Yes, there is a cat.", "Yes"), ("NO", "No"), ("yes or no", "Unknown"),
     ("I cannot tell", "Unknown"), ("Yesterday", "Unknown"), ("", "Unknown")],
)  # fmt: skip
def test_extract_yes_no(text, expected):
    assert vlmeval_metrics.extract_yes_no(text) == expected


OPTIONS = {"A": "a cat", "B": "a dog", "C": "a red car", "D": "a tree"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("B", "B"), ("(C)", "C"), ("D. a tree", "D"), ("The answer is B.", "B"), ("Answer: [D]", "D"),
     ("a red car", "C"), ("It is a dog", "B"),  # option text
     ("A dog is sitting on the mat near the window", "B"),  # "A" here is the article; the text names B
     ("A or B", None), ("a", None), ("nothing like it", None), ("E", None),
     ("a cat " * 20, None)],  # far longer than the options: no text match
)  # fmt: skip
def test_extract_choice(text, expected):
    assert vlmeval_metrics.extract_choice(text, OPTIONS) == expected


# -- metrics ---------------------------------------------------------------------------------------


def test_mme_score_is_acc_plus_acc_plus_per_category(files):
    items = vlmeval_tsv.load_tsv(files["MME"]).items
    # existence: pair 1 both right, pair 2 one right -> acc 75, acc+ 50; code_reasoning: both wrong.
    predictions = {"1": "Yes", "2": "No", "3": "Yes", "4": "Yes, a dog", "5": "No", "6": "maybe"}
    result = vlmeval_metrics.score(items, predictions)
    assert list(result)[:3] == ["perception", "cognition", "total"]
    assert result["existence/acc"] == 75.0 and result["existence/acc+"] == 50.0
    assert result["perception"] == 125.0 and result["cognition"] == 0.0 and result["total"] == 125.0
    assert result["acc"] == 50.0 and result["acc+"] == pytest.approx(100 / 3)
    assert result["unknown"] == pytest.approx(100 / 6)
    assert vlmeval_metrics.score(items, ["yes", "no"] * 3)["total"] == 400.0  # perfect: 200 per category


def test_pope_accuracy_f1_and_yes_ratio(files):
    items = vlmeval_tsv.load_tsv(files["POPE"]).items  # answers Y N Y N Y N
    predictions = ["Yes", "Yes", "No", "No", "Yes, it is", "I don't know"]  # TP FP FN TN TP unknown(=N)
    result = vlmeval_metrics.score(items, predictions)
    assert next(iter(result)) == "f1"
    precision, recall = 2 / 3, 2 / 3
    assert result["precision"] == pytest.approx(100 * precision) and result["recall"] == pytest.approx(100 * recall)
    assert result["f1"] == pytest.approx(100 * 2 / 3)
    assert result["acc"] == pytest.approx(100 * 3 / 6)
    assert result["yes_ratio"] == pytest.approx(100 * 3 / 6)
    # "random,popular" counts in both categories.
    assert result["popular/acc"] == pytest.approx(100 * 2 / 3) and result["random/acc"] == 50.0
    assert result["adversarial/yes_ratio"] == 100.0


def test_mcq_accuracy_per_category_and_mmvp_pairs(files):
    seed = vlmeval_tsv.load_tsv(files["SEEDBench_IMG"]).items  # answers A B C D, categories S I S I
    result = vlmeval_metrics.score(seed, {"100": "A", "101": "a cat", "102": "(C) a red car", "103": "The answer is D"})
    assert result == {"acc": 75.0, "Instance/acc": 50.0, "Scene/acc": 100.0, "unknown": 0.0}
    assert [vlmeval_metrics.correct(i, t) for i, t in zip(seed, ["A", "B", "C", "C"])] == [True, True, True, False]
    mmvp = vlmeval_tsv.load_tsv(files["MMVP"]).items  # answers A B A B, pairs (1, 2) and (3, 4)
    result = vlmeval_metrics.score(mmvp, ["A", "B", "A", "A"])
    assert result["acc"] == 75.0 and result["pair_acc"] == 50.0 and list(result)[:2] == ["pair_acc", "acc"]
    with pytest.raises(ValueError, match="no prediction for 1 item"):
        vlmeval_metrics.score(mmvp, {"1": "A", "2": "B", "3": "A"})


# -- crosstrim eval --data FILE.tsv ----------------------------------------------------------------


def test_a_tsv_source_scores_per_question_and_officially(tmp_path, files):
    data = sources.load(files["SEEDBench_IMG"])
    assert (data.score, data.official, data.headline, data.skipped) == (
        vlmeval_metrics.correct,
        vlmeval_metrics.score,
        "acc",
        [],
    )
    assert [i.id for i in data.items] == ["100", "101", "102", "103"]
    with pytest.raises(UserError, match=r"SEEDBench_IMG.tsv has no 'B' column"):
        rows = [{k: v for k, v in row.items() if k != "B"} for row in seed_rows()]
        sources.load(vlmeval_tsv.write_tsv(tmp_path / "SEEDBench_IMG.tsv", rows))


def wrong(item: Item) -> str:
    options = item.extra.get("options", {"Yes": "", "No": ""})
    return next(answer for answer in options if answer != item.answer)


def fake_predictions(model, processor, items, config, *, progress=None, **_):
    """Untrimmed: every answer right; trimmed: right at even positions, wrong at odd ones."""
    if progress is not None:
        progress(len(items))
    if config is None:
        return [Prediction(item.id, item.answer) for item in items]
    return [
        Prediction(item.id, wrong(item) if n % 2 else item.answer, 17 + n, 68, 4000, 1000 + n)
        for n, item in enumerate(items)
    ]


# The headline metric of every benchmark fixture when every answer is right.
PERFECT = {
    "MME": ("perception", 200.0),
    "POPE": ("f1", 100.0),
    "SEEDBench_IMG": ("acc", 100.0),
    "MMVP": ("pair_acc", 100.0),
}


@pytest.mark.parametrize("name", PERFECT)
def test_eval_reports_each_benchmarks_official_metrics(tmp_path, files, checkpoint_dir, capsys, monkeypatch, name):
    """results.json, results.md and the plot carry the official metrics, recomputable from the saved answers."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(distributed, "predict_sharded", fake_predictions)
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k)))
    code, out, err = run_cli(
        capsys, "eval", "--data", files[name], "--model", checkpoint_dir, "--device", "cpu", "--out", tmp_path / "out",
        "--k-ratios", "0.25", "--keep-ratios", "",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    items = vlmeval_tsv.load_tsv(files[name]).items
    headline, perfect = PERFECT[name]
    assert result["setup"]["headline"] == headline == vlmeval_metrics.headline(name) and result["skipped"] == []
    runs = result["runs"]
    assert [r["label"] for r in runs] == ["full", "trimmed k=0.25", "later layers: 1 token"]
    for run in runs:
        official = vlmeval_metrics.score(items, [p["prediction"] for p in run["predictions"]])
        assert run["official"] == official and next(iter(official)) == headline
        assert run["accuracy"] == pytest.approx(official["acc"] / 100)
    assert runs[0]["official"][headline] == perfect and runs[1]["official"][headline] < perfect
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| cross-attn KV / sample | {headline} |" in table and f"(headline: {headline};" in table
    for run in runs:
        assert f"| {run['label']} |" in table and f"| {run['official'][headline]:.2f} |" in table
    assert table in out
    (axes,) = figures[0].axes
    assert axes.get_ylabel() == f"{headline} (official metric)"
    lines = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert lines["full"][0] == perfect and lines["trimmed (k_ratio)"] == [runs[1]["official"][headline]]


def bad_pope(tmp_path):
    """POPE with a malformed row 3 (a field too many) and an undecodable image in row 5."""
    rows = pope_rows()
    rows[4]["image"] = base64.b64encode(b"GIF89a" + bytes(200)).decode()
    path = vlmeval_tsv.write_tsv(tmp_path / "POPE.tsv", rows)
    lines = path.read_text().splitlines()
    lines[3] += "\textra"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_skip_bad_skips_reports_and_records_bad_rows(tmp_path, checkpoint_dir, capsys):
    """With the real (tiny) model: the bad rows are left out, counted, listed, and the rest is scored."""
    path = bad_pope(tmp_path)
    argv = ["eval", "--data", path, "--model", checkpoint_dir, "--device", "cpu", "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("crosstrim eval: error: POPE.tsv row 3 (line 4): has 6 tab-separated fields")
    assert "--skip-bad" in err and not (tmp_path / "out").exists()
    argv += ["--skip-bad", "--k-ratios", "0.25", "--keep-ratios", "0.5", "--methods", "random", "--batch-size", "3"]
    code, _, err = run_cli(capsys, *argv, "--max-new-tokens", "2")
    assert code == 0, err
    notice = "skipped 2 bad rows (first: POPE.tsv row 3 (line 4): has 6 tab-separated fields, the header has 5)"
    assert [line for line in err.splitlines() if "skipped" in line] == [
        f"crosstrim eval: {notice}; all are listed in results.json"
    ]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["skipped"] == [
        {"where": "POPE.tsv row 3 (line 4)", "index": "", "reason": "has 6 tab-separated fields, the header has 5"},
        {"where": "POPE.tsv row 5 (line 6, index 4)", "index": "4", "reason": "image is not a decodable image"},
    ]
    assert "Skipped 2 bad rows" in (tmp_path / "out" / "results.md").read_text()
    items = vlmeval_tsv.load_tsv(path, skip_bad=True).items
    assert result["setup"]["items"] == 4 and [i.id for i in items] == ["0", "1", "3", "5"]
    for run in result["runs"]:
        assert [p["id"] for p in run["predictions"]] == [i.id for i in items]
        assert run["official"] == vlmeval_metrics.score(items, [p["prediction"] for p in run["predictions"]])
