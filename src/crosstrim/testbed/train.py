"""The training recipe that produces the shipped testbed checkpoint, reproducible from scratch on a CPU.

What makes a tiny stock Mllama learn to *look* (an earlier prototype stalled at chance on questions
that tie a word to a place):

* objects sit one per patch (see :mod:`crosstrim.testbed.data`), so each image token means one cell;
* dense auxiliary losses: a linear probe on every projected image token predicts its cell's shape,
  colour, row and column and what lies in each neighbouring cell (:func:`cell_targets`), and a probe
  on the text rows right after the first cross-attention layer predicts, for every shape or colour
  word, what the image holds for it (:func:`word_targets`); a third probe, on the rows after the
  *second* cross-attention layer, names at every question's ``?`` the object that answers it
  (:func:`look_targets`), so relational questions are answered there, in a layer trimming shrinks.
  The language loss alone is one token per answer; the probes give the vision encoder and the
  cross-attention layers a signal on every token from the first step. All are discarded afterwards;
* the tanh gates of the cross-attention layers start open (Mllama zero-initialises them, which
  leaves the image path unused), and the cross-attention path learns at a higher rate;
* several questions per image: the first is the evaluation prompt, 3 more about the same scene
  follow it in the same sequence. The vision encoder is most of the compute and runs once, while
  the decoder gets four answers to learn from;
* a curriculum: scenes start with one object on one tile and grow to 6 objects on up to 4 tiles over
  the first quarter of training. With one object, *any* object token holds the answer, so attention
  learns to find objects first and only then to tell them apart;
* answers are one word followed by end-of-text, so greedy decoding stops by itself;
* the checkpoint kept is the evaluation with the best worst family on a validation split of its own.

A first attempt with the first cross-attention layer at decoder layer 0 could not be evaluated:
transformers takes the generated length from layer 0's cache, which then holds image tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crosstrim import tiny
from crosstrim.evaluation import inference
from crosstrim.evaluation.dataset import Item
from crosstrim.testbed import data
from crosstrim.testbed import model as testbed_model

VALID_SEED = 4242  # monitoring split: neither the training stream nor the held-out evaluation split
EOS = "<|end_of_text|>"


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run; the defaults reproduce the shipped checkpoint."""

    steps: int = 4500
    batch_size: int = 32
    lr: float = 2e-3
    cross_lr_scale: float = 3.0
    warmup: int = 300
    weight_decay: float = 0.01
    aux_weight: float = 0.5
    gate_init: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_items: int = 300
    questions_per_image: int = 4
    curriculum: float = 0.25
    look_layer: int = 1  # the cross-attention layer (0 = first) whose text rows must name each answer's object


def packed(item: Item, rng: np.random.Generator, questions: int) -> Item:
    """``item`` with its prompt followed by its answer and ``questions - 1`` more questions and answers.

    Every answer is followed by end-of-text. The first question is exactly the evaluation prompt,
    so the packed sequence starts with what the model sees at test time.
    """
    scene = data.scene_of(item)
    pool: dict[str, list[tuple[str, str]]] = {}
    for family, prompt, answer in data.questions(scene):
        pool.setdefault(family, []).append((prompt, answer))
    parts = [(item.prompt, item.answer)]
    for _ in range(questions - 1):
        families = [f for f in data.FAMILIES if any(q not in parts for q in pool.get(f, []))]
        options = [q for q in pool[families[int(rng.integers(len(families)))]] if q not in parts]
        parts.append(options[int(rng.integers(len(options)))])
    return replace(item, prompt=" ".join(f"{q} {a} {EOS}" for q, a in parts))


def batch_inputs(processor, items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Processor inputs for ``items``, left-padded, with position ids that skip the padding exactly as
    ``generate`` computes them, so the model trains on the inputs it is evaluated on."""
    inputs = dict(inference.encode(processor, items, "cpu"))
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs


def answer_targets(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets that are answers (the token after ``?``) or the end-of-text after them; else -100."""
    question = processor.tokenizer.convert_tokens_to_ids("?")
    targets = torch.full_like(input_ids, -100)
    after_question = input_ids[:, :-1] == question
    targets[:, :-1][after_question] = input_ids[:, 1:][after_question]
    after_answer = torch.zeros_like(after_question)
    after_answer[:, 1:] = after_question[:, :-1]
    targets[:, :-1][after_answer] = input_ids[:, 1:][after_answer]
    return targets


CELL_FIELDS = 4 + 2 * len(data.DIRECTIONS)  # shape, colour, row, column; each neighbour's shape and colour


def cell_targets(items: Sequence[Item], max_tiles: int) -> torch.Tensor:
    """Per image token ``(B, tiles, 1 + cells, CELL_FIELDS)``: its cell's shape, colour, row and
    column, then the shape and colour of the neighbouring cell in every direction of
    :data:`data.DIRECTIONS` (across tile borders; off the image counts as empty).

    Class 0 is an empty cell; -100 (ignored) marks CLS tokens and padding tiles. The neighbours are
    what makes *relational* questions learnable: the object a question names carries what is beside
    it, so one look at it answers. Without them the second look (read the cell beside the one found)
    plateaued at 54-65% validation accuracy.
    """
    per_tile, side = data.TILE_CELLS**2, data.TILE_CELLS
    out = torch.full((len(items), max_tiles, 1 + per_tile, CELL_FIELDS), -100, dtype=torch.long)
    for b, item in enumerate(items):
        tile_rows, tile_cols = item.extra["layout"]
        rows, cols = tile_rows * side, tile_cols * side
        shape = np.zeros((rows + 2, cols + 2), dtype=np.int64)  # one empty cell of margin all round
        color = np.zeros_like(shape)
        for r, c, s, col in item.extra["objects"]:
            shape[r + 1, c + 1] = 1 + data.SHAPES.index(s)
            color[r + 1, c + 1] = 1 + list(data.COLORS).index(col)
        grid_r, grid_c = np.mgrid[0:rows, 0:cols]
        fields = [shape[1:-1, 1:-1], color[1:-1, 1:-1], grid_r, grid_c]
        for dr, dc in data.DIRECTIONS.values():
            fields += [a[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols] for a in (shape, color)]
        grid = torch.from_numpy(np.stack(fields, -1))  # (rows, cols, CELL_FIELDS)
        tiles = grid.reshape(tile_rows, side, tile_cols, side, CELL_FIELDS).permute(0, 2, 1, 3, 4)
        out[b, : tile_rows * tile_cols, 1:] = tiles.reshape(tile_rows * tile_cols, per_tile, CELL_FIELDS)
    return out


class FieldProbe(nn.Module):
    """A linear read-out of several class fields (of ``sizes`` classes each) from every hidden row;
    targets are ``(..., len(sizes))`` with -100 where a field is not asked."""

    def __init__(self, hidden: int, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes
        self.head = nn.Linear(hidden, sum(sizes))

    def loss(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(rows.reshape(-1, rows.shape[-1])).split(self.sizes, dim=-1)
        flat = targets.reshape(-1, len(self.sizes))
        return sum(nn.functional.cross_entropy(lg, flat[:, i], ignore_index=-100) for i, lg in enumerate(logits))


LOOK = (1 + len(data.SHAPES), 1 + len(data.COLORS))  # classes of a shape and a colour field (0: empty)


def cell_probe(hidden: int) -> FieldProbe:
    """Linear read-out of :func:`cell_targets` from a projected image token."""
    grid = data.TILE_CELLS * max(max(layout) for layout in data.LAYOUTS)
    return FieldProbe(hidden, (*LOOK, grid, grid, *LOOK * len(data.DIRECTIONS)))


def word_targets(processor, items: Sequence[Item], input_ids: torch.Tensor) -> torch.Tensor:
    """Per text token ``(B, L)``: what the image holds for the shape or colour word at that position.

    A shape word's target is the colour of the one object of that shape, a colour word's the shape
    of the one object of that colour; 0 when no object matches, the last class when several do,
    -100 for every other token. It is the grounding a question word needs, asked of the text rows
    right after the first cross-attention layer, so those rows learn to look up what they name.
    """
    tokenizer = processor.tokenizer
    shape_ids = dict(zip(tokenizer.convert_tokens_to_ids(list(data.SHAPES)), data.SHAPES))
    color_ids = dict(zip(tokenizer.convert_tokens_to_ids(list(data.COLORS)), data.COLORS))
    several = 1 + max(len(data.SHAPES), len(data.COLORS))
    out = torch.full_like(input_ids, -100)
    for b, item in enumerate(items):
        objects = [data.Obj(*o) for o in item.extra["objects"]]
        for t, token in enumerate(input_ids[b].tolist()):
            if token in shape_ids:
                found = [1 + list(data.COLORS).index(o.color) for o in objects if o.shape == shape_ids[token]]
            elif token in color_ids:
                found = [1 + data.SHAPES.index(o.shape) for o in objects if o.color == color_ids[token]]
            else:
                continue
            out[b, t] = found[0] if len(found) == 1 else (0 if not found else several)
    return out


class WordProbe(nn.Module):
    """Linear read-out of :func:`word_targets` from the text rows after the first cross-attention layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, 2 + max(len(data.SHAPES), len(data.COLORS)))

    def loss(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(rows).flatten(0, 1), targets.flatten(), ignore_index=-100)


def look_targets(processor, items: Sequence[Item], input_ids: torch.Tensor) -> torch.Tensor:
    """Per text token ``(B, L, 2)``: at each question's ``?``, the shape and colour of the object whose
    attribute answers it (:func:`data.subject`); -100 elsewhere and for *global* questions.

    Asked of the rows right after the cross-attention layer ``Recipe.look_layer``: the question must
    have found its answer's image token by then, which a relational question can do through the
    neighbours every image token carries ("the cell whose right neighbour is red"). Asked after the
    *first* layer, it got relational questions to 95% but answered them in that first look, so the
    later (trimmed) layers no longer mattered and the testbed could not tell good selection from bad;
    after the second, they still do.
    """
    question = processor.tokenizer.convert_tokens_to_ids("?")
    out = torch.full((*input_ids.shape, 2), -100, dtype=torch.long)
    for b, item in enumerate(items):
        scene = data.scene_of(item)
        prompts = [q.strip() for q in item.prompt.split(EOS) if q.strip()]
        ends = (input_ids[b] == question).nonzero().flatten().tolist()
        for end, prompt in zip(ends, prompts):
            found = data.subject(scene, prompt[: prompt.index("?") + 1])
            if found is not None:
                out[b, end] = torch.tensor(
                    [1 + data.SHAPES.index(found.shape), 1 + list(data.COLORS).index(found.color)]
                )
    return out


def build(seed: int, gate_init: float):
    """A freshly initialised testbed model with its cross-attention gates opened to ``gate_init``."""
    from transformers import MllamaForConditionalGeneration

    processor = testbed_model.build_processor()
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(testbed_model.build_config(len(processor.tokenizer)))
    tiny.set_gates(model, gate_init)  # after construction: __init__ and _init_weights zero them
    return model, processor


@torch.no_grad()
def first_token_accuracy(model, processor, items: Sequence[Item], batch_size: int = 100) -> dict[str, float]:
    """Per-family accuracy of the first greedy token (what ``generate`` would answer), on ``items``."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        logits = model(**batch_inputs(processor, batch)).logits[:, -1]
        guesses = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for item, guess in zip(batch, guesses):
            hits.setdefault(item.category, []).append(guess == item.answer)
    model.train()
    return {family: sum(h) / len(h) for family, h in sorted(hits.items())}


def _optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    cross_prefixes = tuple(f"model.language_model.layers.{i}." for i in testbed_model.CROSS_ATTENTION_LAYERS)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        cross = name.startswith(cross_prefixes) or name.startswith("model.multi_modal_projector.")
        decay = param.dim() >= 2 and "embedding" not in name and "embed_tokens" not in name
        groups.setdefault((cross, decay), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": recipe.lr * (recipe.cross_lr_scale if cross else 1.0),
                "weight_decay": recipe.weight_decay if decay else 0.0,
            }
            for (cross, decay), params in groups.items()
        ],
        betas=(0.9, 0.98),
    )


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    progress: Callable[[int, dict], None] | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train from scratch and save a normal transformers checkpoint (+ processor) to ``out_dir``.

    ``progress(step, metrics)`` is called every step, ``log(record)`` at every evaluation (validation
    accuracy per family, wall time). The checkpoint kept is the evaluation whose worst family is best
    (on the validation split, never the held-out one); its record is returned.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoints are saved often; keep the output to the training bar
    model, processor = build(recipe.seed, recipe.gate_init)
    model.train()
    hidden = model.config.text_config.hidden_size
    probe, word_probe, look_probe = cell_probe(hidden), WordProbe(hidden), FieldProbe(hidden, LOOK)
    captured: dict[str, torch.Tensor] = {}
    layers = model.model.language_model.layers

    def capture(name: str):
        return lambda m, a, out: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    hooks = [
        model.model.multi_modal_projector.register_forward_hook(capture("x")),
        layers[testbed_model.CROSS_ATTENTION_LAYERS[0]].register_forward_hook(capture("rows")),
        layers[testbed_model.CROSS_ATTENTION_LAYERS[recipe.look_layer]].register_forward_hook(capture("look")),
    ]
    optimizer = _optimizer(model, recipe)
    probes = [*probe.parameters(), *word_probe.parameters(), *look_probe.parameters()]
    optimizer.add_param_group({"params": probes, "lr": recipe.lr, "weight_decay": 0.0})
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    valid = [data.make_item(VALID_SEED, i) for i in range(recipe.eval_items)]
    rng = np.random.default_rng(recipe.seed)
    train_seed = data.TRAIN_SEED + recipe.seed
    model_tiles = model.config.vision_config.max_num_tiles
    out = Path(out_dir)
    best: dict = {}
    started = time.perf_counter()
    for step in range(1, recipe.steps + 1):
        scale = min(1.0, step / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / recipe.steps)))
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * max(scale, 0.02)
        stage = min(1.0, step / max(1.0, recipe.curriculum * recipe.steps))
        max_objects, max_tiles = min(data.MAX_OBJECTS, 1 + int(data.MAX_OBJECTS * stage)), min(4, 1 + int(4 * stage))
        first = (step - 1) * recipe.batch_size
        items = [
            data.make_item(train_seed, i, None, max_objects, max_tiles) for i in range(first, first + recipe.batch_size)
        ]
        sequences = [packed(item, rng, recipe.questions_per_image) for item in items]
        inputs = batch_inputs(processor, sequences)
        logits = model(**inputs).logits
        targets = answer_targets(processor, inputs["input_ids"])
        answer_loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux_loss = probe.loss(captured.pop("x"), cell_targets(items, model_tiles))
        rows = captured.pop("rows")
        aux_loss = aux_loss + word_probe.loss(rows, word_targets(processor, items, inputs["input_ids"]))
        aux_loss = aux_loss + look_probe.loss(
            captured.pop("look"), look_targets(processor, sequences, inputs["input_ids"])
        )
        loss = answer_loss + recipe.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        metrics = {"loss": answer_loss.item(), "aux": aux_loss.item()}
        if progress is not None:
            progress(step, metrics)
        if step % recipe.eval_every == 0 or step == recipe.steps:
            record = {
                "step": step,
                "seconds": round(time.perf_counter() - started, 1),
                **{k: round(v, 4) for k, v in metrics.items()},
                "valid": first_token_accuracy(model, processor, valid),
            }
            if log is not None:
                log(record)
            if not best or min(record["valid"].values()) >= min(best["valid"].values()):
                best = record
                _save(model, processor, out, {**record, "recipe": asdict(recipe)})
    for hook in hooks:
        hook.remove()
    return best


def _save(model, processor, out: Path, record: dict) -> None:
    """Save the checkpoint (the best so far on the validation split: worst family first)."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    model.train()
