"""VLMEvalKit's answer extraction and official metrics, for items read by :mod:`crosstrim.evaluation.vlmeval_tsv`.

Answers are read from the generated text with VLMEvalKit's exact-matching rules (no LLM judge), and
scored with each benchmark's official metric:

* MME: per category ``acc`` (questions) and ``acc+`` (both questions of an image right), category
  score ``acc + acc+`` in points, summed into ``perception`` (10 categories, max 2000) and
  ``cognition`` (4 categories, max 800; VLMEvalKit calls it "reasoning");
* POPE: accuracy, precision, recall, F1 ("yes" is positive) and the yes-ratio, overall and per
  category (a row may list several, comma-separated);
* multiple choice (SEEDBench_IMG, MMVP, any other MCQ file): accuracy overall and per category;
  MMVP's headline is ``pair_acc``, VLMEvalKit's case accuracy (both questions of a pair right);
* any other yes/no file: accuracy overall and per category.

Every value is a percentage except MME's points.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence

from crosstrim.evaluation.dataset import Item

MME_PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


# -- answer extraction -----------------------------------------------------------------------------


def _tokens(text: str, punctuation: str) -> list[str]:
    for char in punctuation:
        text = text.replace(char, " ")
    return text.split()


def extract_yes_no(text: str) -> str:
    """``Yes``, ``No`` or ``Unknown``: the words of the answer hold exactly one of yes / no (any case)."""
    words = set(_tokens(text.lower(), string.punctuation))
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer picks, by VLMEvalKit's exact-matching rules, or ``None``.

    First a lone option letter: exactly one of the option letters appears as a word once the
    answer's brackets and punctuation (``.()[],:;!*#{}``) are spaces ("B", "(B) dog", "The answer
    is B."), among its last five words (so the article in "A dog on the left ..." is no answer).
    Failing that, the option text: exactly one option's text appears in the answer (case ignored),
    and the answer is not more than twice as long as all option texts together. Unlike VLMEvalKit
    with a judge model, an answer matching neither is not sent to an LLM: it is wrong.
    """
    words = _tokens(text, ".()[],:;!*#{}")
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    matching = [letter for letter, option in options.items() if str(option).lower() in lowered]
    return matching[0] if len(matching) == 1 else None


def extracted(item: Item, text: str) -> str:
    """What the scorer reads from ``text``: ``Yes``/``No``/``Unknown``, or an option letter/``Unknown``."""
    if "options" in item.extra:
        return extract_choice(text, item.extra["options"]) or "Unknown"
    return extract_yes_no(text)


def correct(item: Item, text: str) -> bool:
    """Whether ``text`` answers ``item`` correctly under its benchmark's extraction (a per-item scorer)."""
    return extracted(item, text) == item.answer


# -- metrics ---------------------------------------------------------------------------------------


def _texts(items: Sequence[Item], predictions: Mapping[str, str] | Sequence[str]) -> list[str]:
    if isinstance(predictions, Mapping):
        missing = [item.id for item in items if item.id not in predictions]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} item(s), e.g. index {missing[0]}")
        return [predictions[item.id] for item in items]
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    return list(predictions)


def _percent(values: Sequence[bool | float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def _mme(items: Sequence[Item], hits: Sequence[bool]) -> dict[str, float]:
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item, hit in zip(items, hits):
        # VLMEvalKit pairs the questions of an image by its image_path; without it, by the image itself.
        key = item.extra.get("image_path") or item.extra.get("image_source") or item.id
        by_category[item.category][key].append(hit)
    result: dict[str, float] = {}
    scores: dict[str, float] = {}
    for category, groups in sorted(by_category.items()):
        acc = _percent([h for group in groups.values() for h in group])
        acc_plus = _percent([all(group) for group in groups.values()])
        scores[category] = acc + acc_plus
        result[f"{category}/acc"] = acc
        result[f"{category}/acc+"] = acc_plus
        result[f"{category}/score"] = acc + acc_plus
    perception = sum(scores.get(c, 0.0) for c in MME_PERCEPTION)
    cognition = sum(scores.get(c, 0.0) for c in MME_COGNITION)
    head = {"perception": perception, "cognition": cognition, "total": perception + cognition}
    head["acc"] = _percent(hits)
    head["acc+"] = _percent([all(g) for groups in by_category.values() for g in groups.values()])
    return head | result


def _binary(answers: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    truth = [a == "Yes" for a in answers]
    said = [p == "Yes" for p in predicted]
    tp = sum(t and s for t, s in zip(truth, said))
    fp = sum(s and not t for t, s in zip(truth, said))
    fn = sum(t and not s for t, s in zip(truth, said))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": 100.0 * f1,
        "acc": _percent([a == p for a, p in zip(answers, predicted)]),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "yes_ratio": _percent(said),
    }


def _pope(items: Sequence[Item], predicted: Sequence[str]) -> dict[str, float]:
    result = _binary([item.answer for item in items], predicted)
    by_category: dict[str, list[int]] = defaultdict(list)
    for row, item in enumerate(items):
        for category in filter(None, (c.strip() for c in item.category.split(","))):
            by_category[category].append(row)
    for category, rows in sorted(by_category.items()):
        part = _binary([items[r].answer for r in rows], [predicted[r] for r in rows])
        result |= {f"{category}/{key}": value for key, value in part.items()}
    return result


def _accuracy(items: Sequence[Item], hits: Sequence[bool]) -> dict[str, float]:
    result = {"acc": _percent(hits)}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for item, hit in zip(items, hits):
        if item.category:
            by_category[item.category].append(hit)
    result |= {f"{category}/acc": _percent(rows) for category, rows in sorted(by_category.items())}
    return result


def _mmvp_pairs(items: Sequence[Item], hits: Sequence[bool]) -> float:
    """VLMEvalKit's MMVP case accuracy: rows with 1-based indices 2c+1 and 2c+2 form case ``c``."""
    cases: dict[object, list[bool]] = defaultdict(list)
    integer = all(re.fullmatch(r"-?\d+", item.id) for item in items)
    for row, (item, hit) in enumerate(zip(items, hits)):
        cases[(int(item.id) - 1) // 2 if integer else row // 2].append(hit)
    return _percent([all(case) for case in cases.values()])


def score(items: Sequence[Item], predictions: Mapping[str, str] | Sequence[str]) -> dict[str, float]:
    """The benchmark's official metrics for ``predictions`` (by item id, or in item order).

    The first key is the headline metric, :func:`headline` (MME ``perception``, POPE ``f1``, MMVP
    ``pair_acc``, other MCQ and yes/no ``acc``); per-category values follow as ``category/metric``.
    ``unknown`` is the percentage of answers from which no yes/no or option could be read (they
    count as wrong).
    """
    if not items:
        raise ValueError("no items to score")
    names = {item.extra.get("benchmark") for item in items}
    if len(names) != 1 or None in names:
        raise ValueError("score() takes the items of one VLMEvalKit benchmark (from load_tsv)")
    name = names.pop()
    texts = _texts(items, predictions)
    predicted = [extracted(item, text) for item, text in zip(items, texts)]
    hits = [p == item.answer for item, p in zip(items, predicted)]
    if name == "MME":
        result = _mme(items, hits)
    elif name == "POPE":
        result = _pope(items, predicted)
    else:
        result = _accuracy(items, hits)
        if name == "MMVP":
            result["pair_acc"] = _mmvp_pairs(items, hits)
    result["unknown"] = _percent([p == "Unknown" for p in predicted])
    first = headline(name)
    return {first: result.pop(first)} | result


def headline(benchmark: str) -> str:
    """The benchmark's headline metric: the one :func:`score` lists first and ``crosstrim eval`` plots."""
    return {"MME": "perception", "POPE": "f1", "MMVP": "pair_acc"}.get(benchmark, "acc")


__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "correct",
    "extract_choice",
    "extract_yes_no",
    "extracted",
    "headline",
    "score",
]
