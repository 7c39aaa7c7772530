"""Small stock-Mllama models and offline processors, built in code with no download.

They back the tests, the demo until a trained testbed exists, and anything else that needs a
real ``MllamaForConditionalGeneration`` on a CPU. The processor (word-level tokenizer plus the
stock ``MllamaImageProcessor``) saves and loads exactly like a real checkpoint's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|python_tag|>")
DEFAULT_WORDS = tuple(
    [
        "what",
        "is",
        "in",
        "the",
        "image",
        "?",
        "describe",
        "it",
        "a",
        "an",
        "red",
        "green",
        "blue",
        "circle",
        "square",
        "triangle",
        "left",
        "right",
        "top",
        "bottom",
        "how",
        "many",
        "shapes",
        "are",
        "there",
        "yes",
        "no",
        "one",
        "two",
        "three",
        "four",
        "of",
        "color",
        "shape",
    ]
)


def tiny_config(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    max_num_tiles: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_global_layers: int = 1,
    text_hidden: int = 64,
    text_layers: int = 7,
    cross_attention_layers: Sequence[int] = (1, 3, 5),
    heads: int = 4,
    kv_heads: int = 2,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
):
    """A ``MllamaConfig`` small enough for CPU tests; every count stays derivable from it."""
    from transformers import MllamaConfig

    intermediate = [0]
    vision = {
        "hidden_size": vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_global_layers": vision_global_layers,
        "attention_heads": 4,
        "intermediate_size": vision_hidden * 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "max_num_tiles": max_num_tiles,
        "intermediate_layers_indices": intermediate,
        "vision_output_dim": vision_hidden * (1 + len(intermediate)),
        "supported_aspect_ratios": [
            [h, w] for h in range(1, max_num_tiles + 1) for w in range(1, max_num_tiles + 1) if h * w <= max_num_tiles
        ],
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": text_hidden * 2,
        "cross_attention_layers": list(cross_attention_layers),
        "max_position_embeddings": 512,
        "rope_scaling": {"rope_type": "default"},
        "rope_theta": 10000.0,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=SPECIAL_TOKENS.index("<|image|>"))


def build_processor(words: Sequence[str] = DEFAULT_WORDS, *, image_size: int = 32, max_num_tiles: int = 4):
    """An offline ``MllamaProcessor``: word-level tokenizer over ``words`` + ``MllamaImageProcessor``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MllamaProcessor, PreTrainedTokenizerFast

    try:  # transformers >= 5 names the torchvision-free image processor explicitly
        from transformers import MllamaImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import MllamaImageProcessor as ImageProcessor

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<|image|>", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|image|>", "<|python_tag|>"],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    image_processor = ImageProcessor(size={"height": image_size, "width": image_size}, max_image_tiles=max_num_tiles)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def random_model(seed: int = 0, *, gate: float = 1.0, processor=None, **config_overrides):
    """A randomly initialised tiny ``MllamaForConditionalGeneration`` with open cross-attention gates.

    Mllama zero-initialises its tanh gates, which would make the image path a no-op; ``gate``
    sets them so the image changes the logits. Returns ``(model, processor)`` in eval mode.
    """
    from transformers import MllamaForConditionalGeneration

    processor = processor or build_processor(
        image_size=config_overrides.get("image_size", 32), max_num_tiles=config_overrides.get("max_num_tiles", 4)
    )
    config = tiny_config(len(processor.tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    set_gates(model, gate)
    return model.eval(), processor


def set_gates(model, value: float) -> None:
    """Set every cross-attention tanh gate of ``model`` to ``value`` (they start at zero)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(value)
