"""Local lmms-eval tasks from crosstrim items, scored the way ``crosstrim eval`` scores them.

:func:`write_task` turns crosstrim items (a VLMEvalKit TSV read by :mod:`crosstrim.evaluation.vlmeval_tsv`,
or the testbed's questions) into a local lmms-eval task scored with the metrics ``crosstrim eval``
uses for them; the task's generated ``utils.py`` calls back into this module. Writing a task needs no
lmms-eval installed; running it does. The model that answers is :mod:`crosstrim.integrations.lmms_eval`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from crosstrim.evaluation import checkpoint, sources, vlmeval_metrics
from crosstrim.evaluation.dataset import Item

_UTILS = '''"""lmms-eval hooks of task {name!r}, written by crosstrim.integrations.lmms_eval_tasks.write_task."""

from pathlib import Path

from crosstrim.integrations import lmms_eval_tasks as _crosstrim

_ROOT = Path(__file__).resolve().parent
METRICS = {metrics!r}


def doc_to_visual(doc):
    return _crosstrim.doc_to_visual(doc, _ROOT)


doc_to_text = _crosstrim.doc_to_text
process_results = _crosstrim.results_for(METRICS)
{aggregators}
'''


def _metric_names(items: Sequence[Item]) -> list[str]:
    """The run-level metrics of a task: a VLMEvalKit benchmark's (see
    :func:`crosstrim.evaluation.vlmeval_metrics.score`), or, for items of no benchmark (the testbed, a
    ``.jsonl`` file), the exact-match accuracy overall and per category that ``crosstrim eval`` reports
    for them (see :func:`exact_match_scores`)."""
    benchmarks = {item.extra.get("benchmark") for item in items}
    if len(benchmarks) != 1:
        raise ValueError(
            "write_task takes the items of one VLMEvalKit benchmark (crosstrim.evaluation.vlmeval_tsv.load_tsv), "
            "or items of none (scored by exact match); these mix several"
        )
    benchmark = benchmarks.pop()
    if benchmark is None:
        return ["accuracy", *(f"{category}/accuracy" for category in dict.fromkeys(i.category for i in items))]
    heads = {
        "MME": ["perception", "cognition", "total", "acc", "acc+"],
        "POPE": ["f1", "acc", "precision", "recall", "yes_ratio"],
        "MMVP": ["acc", "pair_acc"],
    }
    return [*heads.get(benchmark, ["acc"]), "unknown"]


def _identifier(metric: str) -> str:
    return "aggregate_" + re.sub(r"\W", "_", metric.replace("+", "_plus"))


def exact_match_scores(items: Sequence[Item], predictions: Sequence[str]) -> dict[str, float]:
    """Share of answers :func:`crosstrim.evaluation.sources.exact_match` accepts, overall (``accuracy``) and
    per category (``CATEGORY/accuracy``): the fractions ``crosstrim eval`` reports for a ``.jsonl`` file."""
    hits = [sources.exact_match(item, text) for item, text in zip(items, predictions, strict=True)]
    result = {"accuracy": sum(hits) / len(hits)}
    for category in dict.fromkeys(item.category for item in items):
        mine = [hit for item, hit in zip(items, hits) if item.category == category]
        result[f"{category}/accuracy"] = sum(mine) / len(mine)
    return result


def _score(items: Sequence[Item], predictions: Sequence[str]) -> dict[str, float]:
    if items and items[0].extra.get("benchmark") is not None:
        return vlmeval_metrics.score(items, predictions)
    return exact_match_scores(items, predictions)


def write_task(
    items: Sequence[Item], directory: str | Path, name: str, *, max_new_tokens: int = 128, until: Sequence[str] = ()
) -> Path:
    """Write ``items`` as a local lmms-eval task: ``NAME.yaml``, ``docs.jsonl``, ``images/``, ``utils.py``.

    Run it with ``lmms-eval --include_path DIRECTORY --tasks NAME ...`` (no Hub access: the data is
    read with the ``json`` builder). The task's metrics are computed over all documents the way
    ``crosstrim eval`` scores the same items, so lmms-eval reports exactly what it reports from the
    same answers: a VLMEvalKit benchmark's (items from :func:`crosstrim.evaluation.vlmeval_tsv.load_tsv`,
    scored by :func:`crosstrim.evaluation.vlmeval_metrics.score`), otherwise exact-match ``accuracy`` overall and
    ``CATEGORY/accuracy`` (:func:`exact_match_scores`; e.g. :func:`crosstrim.testbed.data.heldout`
    or a ``crosstrim testbed data`` file). ``max_new_tokens`` defaults to 128, the budget VLMEvalKit
    gives Llama-3.2-Vision on yes/no and multiple-choice benchmarks.
    """
    if not items:
        raise ValueError("write_task needs at least one item")
    if not name.replace("_", "").isalnum():
        raise ValueError(f"task name {name!r} must be letters, digits and underscores")
    metrics = _metric_names(items)
    if len({_identifier(m) for m in metrics}) != len(metrics):
        raise ValueError(f"the metrics {metrics} of these items' categories do not give distinct Python names")
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / "docs.jsonl").open("w", encoding="utf-8") as handle:
        for number, item in enumerate(items):
            paths = []
            for k, image in enumerate(item.images):
                relative = f"images/{number}_{k}.png"
                image.save(root / relative)
                paths.append(relative)
            doc = {
                "id": item.id,
                "images": paths,
                "prompt": item.prompt,
                "answer": item.answer,
                "category": item.category,
                "extra": json.dumps(item.extra),
            }
            handle.write(json.dumps(doc) + "\n")
    metric_list = "".join(
        f"  - metric: {json.dumps(metric)}\n    aggregation: !function utils.{_identifier(metric)}\n"
        f"    higher_is_better: {'false' if metric == 'unknown' else 'true'}\n"
        for metric in metrics
    )
    generation = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if until:
        generation["until"] = list(until)
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        f"generation_kwargs: {json.dumps(generation)}\n"
        "process_results: !function utils.process_results\n"
        f"metric_list:\n{metric_list}"
        "metadata:\n  version: 0.0\n"
    )
    aggregators = "".join(f"{_identifier(m)} = _crosstrim.aggregator({m!r})\n" for m in metrics)
    (root / "utils.py").write_text(_UTILS.format(name=name, metrics=metrics, aggregators=aggregators))
    return root / f"{name}.yaml"


def doc_to_visual(doc: dict, root: Path) -> list[Image.Image]:
    """The document's images (paths relative to its task folder), as RGB."""
    return [checkpoint.load_image(root / path) for path in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["prompt"]


def results_for(metrics: Sequence[str]) -> Callable[[dict, list[str]], dict[str, dict]]:
    """``process_results`` of a written task: each metric gets the answer with what scoring needs."""

    def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
        payload = {key: doc[key] for key in ("id", "answer", "category", "extra")}
        payload["prediction"] = results[0] if results else ""
        return dict.fromkeys(metrics, payload)

    return process_results


def aggregator(metric: str) -> Callable[[list[dict]], float]:
    """The aggregation of ``metric``: the task's score (see :func:`write_task`) over all answered documents."""

    def aggregate(payloads: list[dict]) -> float:
        unique = list({p["id"]: p for p in payloads}.values())  # padding duplicates count once
        items = [Item(p["id"], (), "", p["answer"], p["category"], json.loads(p["extra"])) for p in unique]
        return _score(items, [p["prediction"] for p in unique])[metric]

    aggregate.__name__ = _identifier(metric)
    return aggregate


__all__ = ["aggregator", "doc_to_text", "doc_to_visual", "exact_match_scores", "results_for", "write_task"]
