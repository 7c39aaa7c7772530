"""``crosstrim generate``: answer a prompt about images with a trimmed (and optionally the full) model."""

from __future__ import annotations

import argparse

import torch

import crosstrim
from crosstrim.cli import options
from crosstrim.cli.options import load_model
from crosstrim.evaluation import UserError, checkpoint
from crosstrim.evaluation.inference import answer_texts, greedy

# Why ratio 1.0 keeps 100% yet saves no cache, while 0.999 saves the padding tiles' share.
IDENTITY_NOTE = (
    "ratio 1 is the identity: the cache keeps every slot, padding tiles included; any ratio below 1 "
    "drops padding tiles, so 0.999 saves cache for images with fewer tiles than the maximum"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a prompt about images, trimmed")
    options.add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeatable)")
    parser.add_argument("--prompt", required=True, help="question; <|image|> tokens are added when absent")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--compare", action="store_true", help="also run the untrimmed model and show both")
    options.add_trim_arguments(parser)
    parser.set_defaults(run=run)


def answer(model, processor, inputs, max_new_tokens: int) -> str:
    """Greedy answer text (new tokens only, special tokens dropped)."""
    with torch.no_grad():
        tokens = model.generate(**inputs, **greedy(processor, max_new_tokens))
    return answer_texts(processor, tokens, inputs)[0]


def run(args: argparse.Namespace) -> int:
    config = options.trim_config(args)
    if not args.image:
        raise UserError("the prompt has no image; pass at least one --image (crosstrim trims image features)")
    images = [checkpoint.load_image(path) for path in args.image]
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    model, processor, name = load_model(args.model, args.device, args.dtype)
    text = checkpoint.format_prompt(processor, args.prompt, len(images))
    inputs = processor(images=[images], text=[text], return_tensors="pt").to(model.device)
    with crosstrim.trimmed(model, config) as handle:
        trimmed_answer = answer(model, processor, inputs, args.max_new_tokens)
    print(f"model: {name}")
    print(f"answer ({config.describe()}): {trimmed_answer}")
    print(handle.stats.summary())
    if config.is_identity:
        print(IDENTITY_NOTE)
    if args.compare:
        full_answer = answer(model, processor, inputs, args.max_new_tokens)
        print(f"answer (full): {full_answer}")
        print("same answer" if full_answer == trimmed_answer else "answers differ")
    return 0
