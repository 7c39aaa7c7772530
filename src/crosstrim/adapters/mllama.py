"""The Mllama adapter (Llama-3.2-Vision): what crosstrim reads from transformers' Mllama, checked.

crosstrim hooks into a stock model, so a transformers release that renames an argument, an attribute or
the cache layout would otherwise leave it running untrimmed without a word. Everything the engine's hooks
read from an Mllama model is looked up here, and a mismatch is an error naming the version (:func:`drift`).
"""

from __future__ import annotations

from torch import nn

from crosstrim.adapters.base import ModelAdapter, drift, parameters


def check_layout(text: nn.Module, layers: list[int]) -> None:
    """Refuse a model whose hook points, attributes or arguments are not the ones crosstrim reads."""
    blocks = getattr(text, "layers", None)
    if blocks is None or len(blocks) <= layers[-1]:
        raise drift(f"the text decoder has no `layers[{layers[-1]}]` although the config lists it as cross-attention")
    calls = [("the text decoder", text, {"input_ids", "attention_mask", "cross_attention_states"})]
    wanted = {"hidden_states", "cross_attention_states", "cross_attention_mask", "full_text_row_masked_out_mask"}
    calls += [(f"cross-attention layer {idx}", blocks[idx], wanted) for idx in layers]
    for where, module, names in calls:
        accepted = parameters(module.forward)
        missing = sorted(names - accepted)
        if missing:
            raise drift(f"{where}'s forward no longer takes {', '.join(missing)}")
        if not accepted & {"cache", "past_key_values"}:
            raise drift(f"{where}'s forward takes neither `cache` nor `past_key_values`")
    attn = getattr(blocks[layers[0]], "cross_attn", None)
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attn, name, None), nn.Module):
            raise drift(f"the first cross-attention layer has no `cross_attn.{name}` module to capture")
    if not isinstance(getattr(attn, "scaling", None), (int, float)):
        raise drift("the first cross-attention layer has no numeric `cross_attn.scaling`")


def tokens_per_tile(image_size: int, patch_size: int) -> int:
    """Image tokens of one tile: its patches plus one CLS token (1601 for 560 px / patch 14); always derived
    from the config, never assumed (the config default 448 px gives 1025)."""
    return (image_size // patch_size) ** 2 + 1


class MllamaAdapter(ModelAdapter):
    """transformers' ``MllamaForConditionalGeneration`` / ``MllamaModel``: the decoder is the one
    ``MllamaTextModel`` inside (``model.model.language_model`` from 4.52 on), its cross layers are
    ``config.text_config.cross_attention_layers``, queries and keys are ``cross_attn.q_norm`` /
    ``k_norm``'s outputs, and an image slot is ``max_num_tiles * ((image_size // patch_size) ** 2 + 1)``
    tokens."""

    family = "Mllama"
    description = "Llama-3.2-Vision, MllamaForConditionalGeneration"

    def decoder(self, model: nn.Module) -> nn.Module:
        from transformers.models.mllama.modeling_mllama import MllamaTextModel

        if isinstance(model, MllamaTextModel):
            raise TypeError(
                "crosstrim.trim needs the whole vision-language model (MllamaForConditionalGeneration "
                "or MllamaModel), not its text decoder alone"
            )
        found = [m for m in model.modules() if isinstance(m, MllamaTextModel)]
        if len(found) != 1 or getattr(getattr(model, "config", None), "vision_config", None) is None:
            raise TypeError(
                f"crosstrim.trim supports transformers Mllama models (Llama-3.2-Vision, "
                f"MllamaForConditionalGeneration); got {type(model).__name__}"
            )
        return found[0]

    def check_generation_model(self, model: nn.Module) -> None:
        from transformers import MllamaForConditionalGeneration

        if not isinstance(model, MllamaForConditionalGeneration):
            raise TypeError(
                f"crosstrim.generate needs a transformers MllamaForConditionalGeneration (Llama-3.2-Vision), "
                f"got {type(model).__name__}"
            )

    def cross_layers(self, decoder: nn.Module) -> list[int]:
        layers = sorted(int(i) for i in (decoder.config.cross_attention_layers or []))
        if not layers:
            raise ValueError("this Mllama model has no cross-attention layers, so there is nothing to trim")
        check_layout(decoder, layers)
        return layers

    def capture_points(self, decoder: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
        attn = decoder.layers[layer].cross_attn
        return attn.q_norm, attn.k_norm

    def scaling(self, decoder: nn.Module, layer: int) -> float:
        return decoder.layers[layer].cross_attn.scaling

    def image_slot_tokens(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return vision.max_num_tiles * tokens_per_tile(vision.image_size, vision.patch_size)

    def kv_shape(self, decoder: nn.Module) -> tuple[int, int]:
        text = decoder.config
        return text.num_key_value_heads, text.hidden_size // text.num_attention_heads


__all__ = ["MllamaAdapter", "check_layout", "tokens_per_tile"]
