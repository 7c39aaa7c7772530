"""Procedural visual questions about shapes on a grid: the testbed's data, seeded and download-free.

Every object fills exactly one cell of a grid whose cells are the vision encoder's patches, and
whose tiles are the Mllama processor's tiles. An earlier prototype drew free-floating shapes across
patch borders and never learned to tie a word to a place; aligning objects with patches gives every
image token one unambiguous meaning, so which tokens a question needs is known exactly.

Images come in every tile layout a 4-tile Mllama supports (1x1 ... 4x1), so 1-4 real tiles and
padding tiles all occur. Question families need different amounts of the image:

* ``local``: one object named by its shape or colour ("what color is the circle ?");
* ``relational``: the neighbour of a named object ("what shape is left of the red one ?"), which
  needs what lies beside the object found (the training recipe teaches every token its neighbours);
* ``global``: every object ("how many shapes are there ?", "is there a cross ?").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from crosstrim.evaluation.dataset import Item

CELL = 12  # pixels per grid cell = the vision encoder's patch size
TILE_CELLS = 4  # cells per tile side, so a tile is 48 px
TILE = CELL * TILE_CELLS
# (tile rows, tile columns): every aspect ratio the 4-tile processor supports.
LAYOUTS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (1, 4), (4, 1))
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 190, 20),
    "purple": (140, 60, 190),
}
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
DIRECTIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
FAMILIES: tuple[str, ...] = ("local", "relational", "global")
MAX_OBJECTS = len(NUMBERS)

# Seeds of the two splits: items are drawn from disjoint seed streams, one generator per item.
TRAIN_SEED = 20250401
HELDOUT_SEED = 557


@dataclass(frozen=True)
class Obj:
    """One object: grid cell (row, column over the whole image), shape and colour names."""

    row: int
    col: int
    shape: str
    color: str


@dataclass(frozen=True)
class Scene:
    layout: tuple[int, int]
    objects: tuple[Obj, ...]
    background: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout[0] * TILE_CELLS, self.layout[1] * TILE_CELLS

    def at(self, row: int, col: int) -> Obj | None:
        return next((o for o in self.objects if (o.row, o.col) == (row, col)), None)


def vocabulary() -> tuple[str, ...]:
    """Every word a question or an answer can use, in a fixed order (the tokenizer's vocabulary)."""
    words = ["what", "color", "shape", "is", "the", "one", "how", "many", "shapes", "are", "there", "a", "?"]
    words += ["left", "right", "of", "above", "below", "yes", "no"]
    words += [*SHAPES, *COLORS, *NUMBERS]
    return tuple(dict.fromkeys(words))


def _sprite(shape: str) -> np.ndarray:
    """Boolean CELL x CELL footprint of a shape, one pixel of margin on every side."""
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    c = CELL / 2
    if shape == "circle":
        mask = (y - c) ** 2 + (x - c) ** 2 <= (c - 1.5) ** 2
    elif shape == "square":
        mask = (np.abs(y - c) <= c - 2.5) & (np.abs(x - c) <= c - 2.5)
    elif shape == "triangle":
        top, bottom = 1.5, CELL - 1.5
        half = (y - top) / (bottom - top) * (c - 1)
        mask = (y >= top) & (y <= bottom) & (np.abs(x - c) <= half)
    elif shape == "diamond":
        mask = np.abs(y - c) + np.abs(x - c) <= c - 1
    elif shape == "cross":
        arm, bar = c - 1, 1.6
        mask = ((np.abs(y - c) <= bar) & (np.abs(x - c) <= arm)) | ((np.abs(x - c) <= bar) & (np.abs(y - c) <= arm))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


_SPRITES = {shape: _sprite(shape) for shape in SHAPES}


def render(scene: Scene, noise_seed: int) -> Image.Image:
    """Draw ``scene``: a grey background with mild pixel noise and one sprite per object cell."""
    rows, cols = scene.grid
    rng = np.random.default_rng(noise_seed)
    canvas = np.full((rows * CELL, cols * CELL, 3), scene.background, dtype=np.int16)
    canvas += rng.integers(-6, 7, canvas.shape, dtype=np.int16)
    for obj in scene.objects:
        cell = canvas[obj.row * CELL : (obj.row + 1) * CELL, obj.col * CELL : (obj.col + 1) * CELL]
        cell[_SPRITES[obj.shape]] = COLORS[obj.color]
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _scatter(rng: np.random.Generator, layout: tuple[int, int], count: int, taken: dict) -> dict:
    """Fill ``count`` more random free cells of the grid with random objects."""
    rows, cols = layout[0] * TILE_CELLS, layout[1] * TILE_CELLS
    free = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in taken]
    for i in rng.permutation(len(free))[:count]:
        taken[free[i]] = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))
    return taken


def _unique(taken: dict, key: int, value: str, keep: tuple[int, int]) -> None:
    """Make ``keep`` the only object whose attribute ``key`` (0 shape, 1 colour) is ``value``."""
    pool = SHAPES if key == 0 else tuple(COLORS)
    others = [v for v in pool if v != value]
    for cell, attrs in taken.items():
        if cell != keep and attrs[key] == value:
            attrs = list(attrs)
            attrs[key] = others[(cell[0] * 7 + cell[1]) % len(others)]
            taken[cell] = tuple(attrs)


def _scene(layout, taken: dict, background: int) -> Scene:
    objects = tuple(Obj(r, c, s, col) for (r, c), (s, col) in sorted(taken.items()))
    return Scene(layout, objects, background)


def _named(rng: np.random.Generator, taken: dict, cell: tuple[int, int]) -> tuple[str, int]:
    """Name the object at ``cell`` by its shape or its colour, made unique; returns (phrase, key)."""
    key = int(rng.integers(2))
    value = taken[cell][key]
    _unique(taken, key, value, cell)
    return (f"the {value}" if key == 0 else f"the {value} one"), key


def question(
    family: str, rng: np.random.Generator, max_objects: int = MAX_OBJECTS, max_tiles: int = 4
) -> tuple[Scene, str, str, dict]:
    """Draw a scene and a question of ``family`` about it: ``(scene, prompt, answer, details)``.

    ``max_objects`` and ``max_tiles`` below their defaults are the training curriculum's early, smaller
    scenes (relational scenes always hold at least the two objects the question is about).
    """
    layout = _pick(rng, [layout for layout in LAYOUTS if layout[0] * layout[1] <= max_tiles])
    background = int(rng.integers(215, 250))
    if family == "local":
        taken = _scatter(rng, layout, int(rng.integers(1, max_objects + 1)), {})
        target = _pick(rng, sorted(taken))
        phrase, key = _named(rng, taken, target)
        asked = 1 - key
        prompt = f"what {'shape' if asked == 0 else 'color'} is {phrase} ?"
        return _scene(layout, taken, background), prompt, taken[target][asked], {"template": "attribute"}
    if family == "relational":
        rows, cols = layout[0] * TILE_CELLS, layout[1] * TILE_CELLS
        direction = _pick(rng, tuple(DIRECTIONS))
        dr, dc = DIRECTIONS[direction]
        anchors = [(r, c) for r in range(rows) for c in range(cols) if 0 <= r + dr < rows and 0 <= c + dc < cols]
        anchor = _pick(rng, anchors)
        neighbour = (anchor[0] + dr, anchor[1] + dc)
        taken = {anchor: (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))}
        taken[neighbour] = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))
        taken = _scatter(rng, layout, int(rng.integers(0, max(0, max_objects - 2) + 1)), taken)
        phrase, key = _named(rng, taken, anchor)
        asked = int(rng.integers(2))
        prompt = f"what {'shape' if asked == 0 else 'color'} is {direction} {phrase} ?"
        details = {"template": "neighbour", "direction": direction}
        return _scene(layout, taken, background), prompt, taken[neighbour][asked], details
    if family == "global":
        count = int(rng.integers(1, max_objects + 1))
        taken = _scatter(rng, layout, count, {})
        if rng.integers(2):
            return (
                _scene(layout, taken, background),
                "how many shapes are there ?",
                NUMBERS[count - 1],
                {"template": "count"},
            )
        shape = _pick(rng, SHAPES)
        present = bool(rng.integers(2))
        if present and not any(s == shape for s, _ in taken.values()):
            cell = _pick(rng, sorted(taken))
            taken[cell] = (shape, taken[cell][1])
        if not present:
            others = [s for s in SHAPES if s != shape]
            for i, cell in enumerate(sorted(taken)):
                if taken[cell][0] == shape:
                    taken[cell] = (others[i % len(others)], taken[cell][1])
        answer = "yes" if present else "no"
        return _scene(layout, taken, background), f"is there a {shape} ?", answer, {"template": "exists"}
    raise ValueError(f"unknown question family {family!r}; choose one of {', '.join(FAMILIES)}")


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the templates can ask about ``scene``, as ``(family, prompt, answer)``.

    Training packs several of these after the first question of an image: the vision encoder (most
    of the compute) runs once and the decoder gets several answers to learn from.
    """
    shapes = [o.shape for o in scene.objects]
    colors = [o.color for o in scene.objects]
    named = []  # (object, phrase naming it uniquely)
    for o in scene.objects:
        if shapes.count(o.shape) == 1:
            named.append((o, f"the {o.shape}"))
        if colors.count(o.color) == 1:
            named.append((o, f"the {o.color} one"))
    found = []
    for o, phrase in named:
        asked = "color" if phrase.endswith(o.shape) else "shape"
        found.append(("local", f"what {asked} is {phrase} ?", o.color if asked == "color" else o.shape))
        for direction, (dr, dc) in DIRECTIONS.items():
            other = scene.at(o.row + dr, o.col + dc)
            if other is not None:
                for asked in ("shape", "color"):
                    answer = other.shape if asked == "shape" else other.color
                    found.append(("relational", f"what {asked} is {direction} {phrase} ?", answer))
    found.append(("global", "how many shapes are there ?", NUMBERS[len(scene.objects) - 1]))
    found += [("global", f"is there a {shape} ?", "yes" if shape in shapes else "no") for shape in SHAPES]
    return found


def scene_of(item: Item) -> Scene:
    """The scene ``item.extra`` records (layout and objects; the background shade is not kept)."""
    return Scene(tuple(item.extra["layout"]), tuple(Obj(*o) for o in item.extra["objects"]), 0)


def subject(scene: Scene, prompt: str) -> Obj | None:
    """The object whose shape or colour answers a *local* or *relational* ``prompt``; None for *global*.

    Training asks the first look for it (see :func:`crosstrim.testbed.train.look_targets`).
    """
    words = prompt.split()
    if words[0] != "what":
        return None
    named = words[-3] if words[-2] == "one" else words[-2]
    anchor = next(o for o in scene.objects if named in (o.shape, o.color))
    direction = " ".join(words[3 : words.index("the")])
    if not direction:
        return anchor
    dr, dc = DIRECTIONS[direction]
    return scene.at(anchor.row + dr, anchor.col + dc)


def make_item(
    split_seed: int, index: int, family: str | None = None, max_objects: int = MAX_OBJECTS, max_tiles: int = 4
) -> Item:
    """Item ``index`` of a split: a pure function of ``(split_seed, index)``, whatever else is drawn."""
    rng = np.random.default_rng([split_seed, index])
    family = family or FAMILIES[index % len(FAMILIES)]
    scene, prompt, answer, details = question(family, rng, max_objects, max_tiles)
    image = render(scene, noise_seed=int(rng.integers(2**31)))
    extra = {
        **details,
        "layout": list(scene.layout),
        "objects": [[o.row, o.col, o.shape, o.color] for o in scene.objects],
    }
    return Item(f"testbed-{split_seed}-{index}", (image,), prompt, answer, family, extra)


def heldout(count: int, start: int = 0) -> list[Item]:
    """The held-out split's items ``start .. start+count-1``; families rotate so any prefix is balanced."""
    return [make_item(HELDOUT_SEED, i) for i in range(start, start + count)]
