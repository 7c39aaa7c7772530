"""What should text rows *before* ``<|image|>`` attend to in the trimmed cross-attention layers?

transformers' Mllama lets a row that may attend no image token (text before ``<|image|>``) attend
*every* image slot, padding tiles included (its mask row becomes all zero), and adds that attention
output to the residual; Meta's reference code multiplies it by zero. Under trimming crosstrim gives
those rows the kept tokens only (plus the summary token with ``summarize_dropped``). This script
measures three answers on testbed questions preceded by another question and its answer about the
same image (``q0 a0 <|end_of_text|> <|image|> q1``):

* ``kept`` -- crosstrim as it is;
* ``all (stock view)`` -- pre-image rows see every slot as in the untrimmed model, post-image rows
  only the kept tokens (the unpatched model with dropped tokens masked for post-image rows; it keeps
  the full cache, so it is a measurement, not an implementation);
* ``none`` -- the trimmed layers' attention output is zeroed for pre-image rows (what Meta's reference
  computes for them in every layer).

``no prefix`` rows answer the same questions without the prefix (the ordinary prompt), for a paired
comparison of what the prefix itself costs.

Accuracy and agreement with the untrimmed model, per tile count, with Wilson 95% intervals::

    OMP_NUM_THREADS=1 python benchmarks/pre_image_rows.py --count 600
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch

import crosstrim
from crosstrim.core import TrimConfig
from crosstrim.evaluation import checkpoint, sources
from crosstrim.evaluation.calibration import wilson_interval
from crosstrim.evaluation.inference import batches, encode
from crosstrim.testbed import CHECKPOINT, data

SEED = 3003  # a split of its own: not training, validation, held-out or the calibration experiment's


def with_prefix(item):
    """``item`` asked after another question about its image, answered correctly, before ``<|image|>``."""
    pool = [(p, a) for f, p, a in data.questions(data.scene_of(item)) if p != item.prompt]
    rng = np.random.default_rng([SEED, int(item.id.rsplit("-", 1)[1])])
    prompt, answer = pool[int(rng.integers(len(pool)))]
    return replace(item, prompt=f"{prompt} {answer} <|end_of_text|> <|image|> {item.prompt}")


def text_of(model):
    return model.model.language_model


@contextlib.contextmanager
def zero_pre_image_rows(model):
    """Zero the later cross-attention layers' attention output on rows that may attend no image token."""
    text = text_of(model)
    layers = sorted(text.config.cross_attention_layers)[1:]
    rows: dict[int, torch.Tensor | None] = {}
    hooks = []
    for idx in layers:
        layer = text.layers[idx]

        def note(module, args, kwargs, idx=idx):
            rows[idx] = kwargs.get("full_text_row_masked_out_mask")

        def zero(module, args, output, idx=idx):
            mask = rows.get(idx)
            if mask is None:
                return None
            return (output[0] * mask[:, 0].to(output[0].dtype), *output[1:])

        hooks.append(layer.register_forward_pre_hook(note, with_kwargs=True))
        hooks.append(layer.cross_attn.register_forward_hook(zero))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def stock_view(model, keep: torch.Tensor):
    """Unpatched model; later layers mask the dropped tokens (``~keep``, (B, N)) for post-image rows only."""
    text = text_of(model)
    layers = sorted(text.config.cross_attention_layers)[1:]

    def hook(module, args, kwargs):
        mask = kwargs.get("cross_attention_mask")
        rows = kwargs.get("full_text_row_masked_out_mask")
        if mask is None:
            return None
        drop = ~keep.to(mask.device)[:, None, None, :]
        if rows is not None:
            drop = drop & (rows != 0)
        return args, dict(kwargs, cross_attention_mask=mask.masked_fill(drop, torch.finfo(mask.dtype).min))

    hooks = [text.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def generate(model, processor, inputs, max_new_tokens=4) -> list[str]:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def run(model, processor, items, batch_size) -> dict[str, list[str]]:
    selections = {
        "k=0.25": TrimConfig(k_ratio=0.25),
        "k=0.25 +summary": TrimConfig(k_ratio=0.25, summarize_dropped=True),
        "keep=0.25 +summary": TrimConfig(keep_ratio=0.25, summarize_dropped=True),
    }
    answers: dict[str, list[str]] = defaultdict(list)
    for batch in batches(items, batch_size):
        inputs = encode(processor, batch, "cpu")
        plain = encode(processor, [replace(i, prompt=i.prompt.rsplit("<|image|> ", 1)[1]) for i in batch], "cpu")
        answers["full, no prefix"] += generate(model, processor, plain)
        answers["full"] += generate(model, processor, inputs)
        with zero_pre_image_rows(model):
            answers["full, none (later layers)"] += generate(model, processor, inputs)
        for name, config in selections.items():
            with crosstrim.trimmed(model, config):
                answers[f"{name}, no prefix"] += generate(model, processor, plain)
            with crosstrim.trimmed(model, config) as handle:
                answers[f"{name}, kept"] += generate(model, processor, inputs)
                kept = handle.stats.kept_indices
                tokens = handle.stats.image_tokens
            with crosstrim.trimmed(model, config), zero_pre_image_rows(model):
                answers[f"{name}, none"] += generate(model, processor, inputs)
            if not config.summarize_dropped:
                keep = torch.zeros(len(batch), tokens, dtype=torch.bool)
                for b, idx in enumerate(kept):
                    keep[b, idx] = True
                with stock_view(model, keep):
                    answers[f"{name}, all (stock view)"] += generate(model, processor, inputs)
    return answers


def cell(flags: list[bool]) -> str:
    k, n = sum(flags), len(flags)
    if not n:
        return "n/a"
    low, high = wilson_interval(k, n)
    return f"{k / n:.1%} [{low:.0%}, {high:.0%}]"


def paired(a: list[bool], b: list[bool]) -> str:
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    if not any(d):
        return f"same on all {n}"
    mean = sum(d) / n
    half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return f"{mean:+.1%} [{mean - half:+.1%}, {mean + half:+.1%}] n={n}"


def prefix_cost(items, answers) -> None:
    """Paired accuracy difference, prefix minus no prefix, per question template."""
    templates = sorted({i.extra["template"] for i in items})
    print("\nWhat the prefix costs (paired, same questions; 95% interval of the mean difference):\n")
    print("| selection | all | " + " | ".join(templates) + " |")
    print("|---|---|" + "---|" * len(templates))
    for name in [n.removesuffix(", no prefix") for n in answers if n.endswith(", no prefix")]:
        prefixed = answers[name if name == "full" else f"{name}, kept"]
        with_prefix_ = [sources.exact_match(i, t) for i, t in zip(items, prefixed)]
        without = [sources.exact_match(i, t) for i, t in zip(items, answers[f"{name}, no prefix"])]
        cells = [paired(with_prefix_, without)]
        for template in templates:
            pick = [i.extra["template"] == template for i in items]
            cells.append(paired([c for c, p in zip(with_prefix_, pick) if p], [c for c, p in zip(without, pick) if p]))
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write every answer as JSON here")
    parser.add_argument("--answers", help="re-analyse answers an earlier --out wrote (.json or .json.gz)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    items = [with_prefix(data.make_item(SEED, i)) for i in range(args.count)]
    if args.answers:
        with (gzip.open if args.answers.endswith(".gz") else open)(args.answers, "rt") as handle:
            answers = json.load(handle)["answers"]
    else:
        model, processor = checkpoint.load(CHECKPOINT, "cpu")
        answers = run(model, processor, items, args.batch_size)
    tiles = [i.extra["layout"][0] * i.extra["layout"][1] for i in items]
    groups = sorted(set(tiles))
    print(f"{args.count} testbed items (split seed {SEED}), each preceded by another question and its answer\n")
    head = "| run | acc, all | " + " | ".join(f"acc, {t} tile{'s' * (t > 1)}" for t in groups)
    print(head + " | agreement with full, all | agreement, 1 tile |")
    print("|---|---|" + "---|" * len(groups) + "---|---|")
    for name, texts in answers.items():
        correct = [sources.exact_match(i, t) for i, t in zip(items, texts)]
        agree = [t == f for t, f in zip(texts, answers["full"])]
        cells = [cell(correct)] + [cell([c for c, n in zip(correct, tiles) if n == t]) for t in groups]
        cells += [cell(agree), cell([a for a, n in zip(agree, tiles) if n == 1])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    prefix_cost(items, answers)
    if args.out:
        record = {"items": [i.id for i in items], "prompts": [i.prompt for i in items], "answers": answers}
        with open(args.out, "w") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    main()
