"""The testbed model: a small *stock* ``MllamaForConditionalGeneration`` and its offline processor.

Shapes follow the data (:mod:`crosstrim.testbed.data`): 48 px tiles of 12 px patches, so every
patch is one grid cell and an image has up to 4 x (16 + 1) = 68 image tokens. The text decoder has
a single self-attention layer before its first cross-attention layer (Llama-3.2-Vision 11B has
three), so the first look is taken with little question context and the later cross-attention
layers have work left to do -- which is what lets the testbed tell good token selection from bad.
The first cross-attention layer cannot be layer 0: transformers reads the generation length from
layer 0's cache, which for a cross-attention layer holds image tokens.
"""

from __future__ import annotations

from crosstrim import tiny
from crosstrim.testbed import data

TEXT_LAYERS = 6
CROSS_ATTENTION_LAYERS = (1, 3, 5)


def build_processor():
    """Word-level tokenizer over the testbed vocabulary + the stock ``MllamaImageProcessor``."""
    return tiny.build_processor(data.vocabulary(), image_size=data.TILE, max_num_tiles=4)


def build_config(vocab_size: int):
    """The ``MllamaConfig``: 64-wide vision encoder (2 + 1 layers), 128-wide 6-layer text decoder with
    4 query and 4 KV heads (the recipe with the answer probe was only run with 4 KV heads; an earlier
    checkpoint had 2, grouped like Llama-3.2-Vision's)."""
    return tiny.tiny_config(
        vocab_size,
        image_size=data.TILE,
        patch_size=data.CELL,
        max_num_tiles=4,
        vision_hidden=64,
        vision_layers=2,
        vision_global_layers=1,
        text_hidden=128,
        text_layers=TEXT_LAYERS,
        cross_attention_layers=CROSS_ATTENTION_LAYERS,
        heads=4,
        kv_heads=4,
    )
