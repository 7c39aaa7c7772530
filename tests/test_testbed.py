"""The testbed: seeded data whose answers follow from the scene, the training recipe, the shipped checkpoint."""

import json

import numpy as np
import pytest
import torch

from crosstrim import cli, testbed
from crosstrim.evaluation import sources
from crosstrim.testbed import data, train

DIRECTION = data.DIRECTIONS


def _objects(item):
    return [data.Obj(*o) for o in item.extra["objects"]]


def _named(objects, phrase):
    """The object a phrase such as 'the circle' / 'the red one' names; it must be unique."""
    words = phrase.split()
    if words[-1] == "one":
        found = [o for o in objects if o.color == words[-2]]
    else:
        found = [o for o in objects if o.shape == words[-1]]
    assert len(found) == 1, (phrase, objects)
    return found[0]


def test_items_are_a_pure_function_of_seed_and_index():
    a, b = data.make_item(7, 3), data.make_item(7, 3)
    assert (a.prompt, a.answer, a.extra) == (b.prompt, b.answer, b.extra)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    c = data.make_item(7, 4)
    assert (c.prompt, c.extra) != (a.prompt, a.extra)
    assert [i.id for i in data.heldout(3, start=2)] == [i.id for i in data.heldout(5)[2:]]


def test_heldout_families_rotate_and_layouts_cover_one_to_four_tiles():
    items = data.heldout(120)
    assert [i.category for i in items[:6]] == list(data.FAMILIES) * 2
    tiles = {r * c for r, c in (tuple(i.extra["layout"]) for i in items)}
    assert tiles == {1, 2, 3, 4}
    for item in items[:10]:
        rows, cols = item.extra["layout"]
        assert item.images[0].size == (cols * data.TILE, rows * data.TILE)


@pytest.mark.parametrize("family", data.FAMILIES)
def test_answers_follow_from_the_scene(family):
    for index in range(60):
        item = data.make_item(11, index, family)
        objects = _objects(item)
        assert 1 <= len(objects) <= data.MAX_OBJECTS
        words = item.prompt.rstrip(" ?").split()
        if item.prompt.startswith("how many"):
            assert item.answer == data.NUMBERS[len(objects) - 1]
        elif item.prompt.startswith("is there"):
            assert item.answer == ("yes" if any(o.shape == words[-1] for o in objects) else "no")
        elif family == "local":
            target = _named(objects, " ".join(words[3:]))
            assert item.answer == (target.color if words[1] == "color" else target.shape)
        else:
            direction = next(d for d in DIRECTION if f" {d} " in item.prompt)
            anchor = _named(objects, item.prompt.split(direction)[1].rstrip(" ?"))
            dr, dc = DIRECTION[direction]
            other = next(o for o in objects if (o.row, o.col) == (anchor.row + dr, anchor.col + dc))
            assert item.answer == (other.color if words[1] == "color" else other.shape)
        assert (family, item.prompt, item.answer) in data.questions(data.scene_of(item))


def test_every_object_is_drawn_inside_its_own_patch():
    item = data.make_item(3, 0, "global")
    pixels = np.asarray(item.images[0]).astype(int)
    cells = {(o.row, o.col): o for o in _objects(item)}
    rows, cols = pixels.shape[0] // data.CELL, pixels.shape[1] // data.CELL
    for r in range(rows):
        for c in range(cols):
            cell = pixels[r * data.CELL : (r + 1) * data.CELL, c * data.CELL : (c + 1) * data.CELL]
            coloured = (cell.max(-1) - cell.min(-1)) > 60  # grey background has no saturated pixel
            if (r, c) in cells:
                colour = np.array(data.COLORS[cells[(r, c)].color])
                assert coloured.sum() >= 20 and np.abs(cell[coloured] - colour).max() == 0
            else:
                assert not coloured.any()


def test_processor_sees_padding_tiles_and_the_recipe_targets_every_cell():
    processor = _processor()
    items = [data.make_item(5, i) for i in range(12)]
    inputs = train.batch_inputs(processor, items)
    tiles = inputs["aspect_ratio_mask"][:, 0].sum(-1).tolist()
    assert tiles == [r * c for r, c in (i.extra["layout"] for i in items)]
    targets = train.cell_targets(items, 4)
    for b, item in enumerate(items):
        real = targets[b, : tiles[b], 1:, 0]
        assert (real > 0).sum() == len(item.extra["objects"])  # one labelled cell per object
        assert (targets[b, tiles[b] :] == -100).all() and (targets[b, :, 0] == -100).all()  # padding, CLS


def test_cell_targets_give_every_token_its_neighbours_across_tile_borders():
    objects = [[0, 3, "circle", "red"], [0, 4, "cross", "blue"], [1, 3, "square", "green"]]
    item = data.make_item(1, 0)
    item = type(item)("x", item.images, "q", "a", "relational", {"layout": [1, 2], "objects": objects})
    targets = train.cell_targets([item], 4)[0]
    per_tile = data.TILE_CELLS**2
    directions = list(data.DIRECTIONS)

    def fields(row, col):  # the token of cell (row, col): tile, then 1 + patch (CLS first)
        tile, patch = col // data.TILE_CELLS, row * data.TILE_CELLS + col % data.TILE_CELLS
        return targets[tile, 1 + patch].tolist()

    def neighbour(row, col, direction):
        at = 4 + 2 * directions.index(direction)
        return fields(row, col)[at : at + 2]

    shape, colour = (lambda s: 1 + data.SHAPES.index(s)), (lambda c: 1 + list(data.COLORS).index(c))
    assert fields(0, 3)[:4] == [shape("circle"), colour("red"), 0, 3]
    assert neighbour(0, 3, "right of") == [shape("cross"), colour("blue")]  # in the next tile
    assert neighbour(0, 4, "left of") == [shape("circle"), colour("red")]
    assert neighbour(0, 3, "below") == [shape("square"), colour("green")]
    assert neighbour(1, 3, "above") == [shape("circle"), colour("red")]
    assert neighbour(0, 3, "above") == [0, 0]  # off the image: empty
    assert neighbour(0, 0, "right of") == [0, 0]  # an empty cell beside an empty cell
    assert targets.shape == (4, 1 + per_tile, train.CELL_FIELDS) and (targets[2:] == -100).all()


def _processor():
    from crosstrim.testbed import model

    return model.build_processor()


def test_packed_training_sequence_starts_with_the_eval_prompt_and_targets_only_answers():
    processor = _processor()
    item = data.make_item(9, 1)
    packed = train.packed(item, np.random.default_rng(0), 3)
    assert packed.prompt.startswith(f"{item.prompt} {item.answer} {train.EOS} ")
    inputs = train.batch_inputs(processor, [packed])
    targets = train.answer_targets(processor, inputs["input_ids"])[0]
    words = processor.tokenizer.convert_ids_to_tokens([int(t) for t in targets if t >= 0])
    assert words[:2] == [item.answer, train.EOS] and len(words) == 6 and words[1::2] == [train.EOS] * 3


def test_word_targets_name_what_the_image_holds_for_each_shape_and_colour_word():
    processor = _processor()
    objects = [[0, 0, "circle", "red"], [0, 1, "square", "red"], [1, 0, "cross", "blue"]]
    item = data.make_item(1, 0)
    item = type(item)("x", item.images, "is there a circle ?", "yes", "global", {"layout": [1, 1], "objects": objects})
    prompt = "what color is the circle ? red what shape is the red one ? blue square triangle"
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    targets = train.word_targets(processor, [item], ids)[0].tolist()
    named = {w: t for w, t in zip(prompt.split(), targets) if t != -100}
    colours, shapes = list(data.COLORS), list(data.SHAPES)
    assert named["circle"] == 1 + colours.index("red") and named["blue"] == 1 + shapes.index("cross")
    assert named["red"] == 1 + max(len(shapes), len(colours))  # two red objects
    assert named["triangle"] == 0 and named["square"] == 1 + colours.index("red")
    assert sum(t != -100 for t in targets) == 6


def test_look_targets_name_the_object_that_answers_each_question_at_its_question_mark():
    processor = _processor()
    objects = [[0, 0, "circle", "red"], [0, 1, "square", "blue"], [1, 1, "cross", "green"]]
    item = data.make_item(1, 0)
    prompt = (
        f"what color is right of the circle ? blue {train.EOS} how many shapes are there ? three {train.EOS}"
        f" what shape is the green one ? cross {train.EOS} what shape is above the cross ? square {train.EOS}"
    )
    item = type(item)("x", item.images, prompt, "blue", "relational", {"layout": [1, 1], "objects": objects})
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    targets = train.look_targets(processor, [item], ids)[0]
    marked = (targets[:, 0] != -100).nonzero().flatten().tolist()
    question_marks = [i for i, t in enumerate(processor.tokenizer.convert_ids_to_tokens(ids[0])) if t == "?"]
    assert marked == [question_marks[0], question_marks[2], question_marks[3]]  # the count has no subject

    def look(shape, colour):
        return [1 + data.SHAPES.index(shape), 1 + list(data.COLORS).index(colour)]

    assert [targets[i].tolist() for i in marked] == [
        look("square", "blue"),
        look("cross", "green"),
        look("square", "blue"),
    ]
    assert (targets[:, 1] != -100).sum() == 3


def test_subject_of_every_generated_question_holds_its_answer():
    for index in range(60):
        item = data.make_item(3, index)
        found = data.subject(data.scene_of(item), item.prompt)
        if item.category == "global":
            assert found is None
        else:
            assert item.answer in (found.shape, found.color)


def test_a_few_training_steps_write_a_checkpoint_with_open_gates(tmp_path):
    recipe = train.Recipe(steps=2, batch_size=4, eval_every=2, eval_items=6, warmup=1)
    record = train.train(recipe, tmp_path)
    assert set(record["valid"]) == set(data.FAMILIES)
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    gates = [p for n, p in model.named_parameters() if n.endswith("cross_attn_attn_gate")]
    assert len(gates) == 3 and all(float(g.abs()) > 0.5 for g in gates)
    assert json.loads((tmp_path / "training.json").read_text())["recipe"]["steps"] == 2


def test_shipped_checkpoint_loads_as_a_normal_transformers_checkpoint():
    from transformers import AutoProcessor, MllamaForConditionalGeneration, MllamaProcessor

    files = {p.name for p in testbed.CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= files or "model.safetensors" in files
    assert sum(p.stat().st_size for p in testbed.CHECKPOINT.iterdir()) < 10 * 1024 * 1024
    processor = AutoProcessor.from_pretrained(testbed.CHECKPOINT)
    model = MllamaForConditionalGeneration.from_pretrained(testbed.CHECKPOINT)
    assert isinstance(processor, MllamaProcessor)
    assert len(model.config.text_config.cross_attention_layers) >= 3


def test_shipped_checkpoint_was_trained_with_the_default_recipe():
    """`crosstrim testbed train` (the Recipe defaults) must be the command that reproduces it."""
    from dataclasses import asdict

    record = json.loads((testbed.CHECKPOINT / "training.json").read_text())
    assert record["recipe"] == asdict(train.Recipe())
    assert record["step"] <= record["recipe"]["steps"]


def test_shipped_checkpoint_answers_held_out_questions():
    """Guards against shipping an untrained or broken model: chance is about 30% here."""
    from crosstrim.evaluation import checkpoint
    from crosstrim.evaluation.inference import predict

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = checkpoint.load(testbed.CHECKPOINT, "cpu")
    items = data.heldout(60)
    predictions = predict(model, processor, items, batch_size=30, max_new_tokens=3)
    accuracy = sum(sources.exact_match(i, p.text) for i, p in zip(items, predictions)) / len(items)
    assert accuracy >= 0.75


def test_cli_exports_held_out_questions_that_load_back(tmp_path, capsys):
    assert cli.main(["testbed", "data", "--out", str(tmp_path), "--count", "4"]) == 0
    dataset = sources.load(tmp_path / "heldout.jsonl")
    items = dataset.items
    expected = data.heldout(4)
    assert [(i.id, i.prompt, i.answer, i.category) for i in items] == [
        (i.id, i.prompt, i.answer, i.category) for i in expected
    ]
    assert np.array_equal(np.asarray(items[0].images[0]), np.asarray(expected[0].images[0]))
    assert dataset.score is sources.exact_match and dataset.official is None
