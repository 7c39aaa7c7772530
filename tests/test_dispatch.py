"""Trimming a model that accelerate dispatched (device_map): offloaded layers, hooks of both libraries."""

import pytest
import torch
from support import inputs, positions

import crosstrim
from crosstrim import tiny

pytest.importorskip("accelerate")

BATCH = [
    ([2, 1], "<|image|> what is the color <|image|> of the circle ?"),
    ([4], "<|image|> how many shapes are there ?"),
]
GREEDY = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


def run(model, batch, config):
    with torch.no_grad(), crosstrim.trimmed(model, config) as handle:
        logits = model(**batch, position_ids=positions(batch["attention_mask"])).logits
        tokens = model.generate(**batch, **GREEDY)
    return logits, tokens, handle.stats.kept_counts


@pytest.mark.parametrize("config", [crosstrim.TrimConfig(k_ratio=0.1), crosstrim.TrimConfig(keep_ratio=0.3)])
def test_dispatched_model_with_offloaded_layers_trims_like_the_plain_one(tmp_path, config):
    from transformers import MllamaForConditionalGeneration

    model, processor = tiny.random_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    batch = inputs(processor, BATCH)
    expected = run(model, batch, config)
    with torch.no_grad():
        untrimmed = model(**batch, position_ids=positions(batch["attention_mask"])).logits
    # The first cross-attention layer (1) and a later one (5) stream their weights from disk; layer 3,
    # the vision model and the head run from CPU memory: accelerate's hooks move weights and
    # inputs around every one of them, beside crosstrim's hooks.
    text = "model.language_model"
    device_map = {"model.vision_model": "cpu", "model.multi_modal_projector": "disk", "lm_head": "disk"}
    device_map |= {f"{text}.{name}": "cpu" for name in ("embed_tokens", "norm", "rotary_emb")}
    device_map |= {f"{text}.layers.{i}": "disk" if i in (1, 2, 5) else "cpu" for i in range(7)}
    dispatched = MllamaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    layers = dispatched.model.language_model.layers
    assert layers[1].cross_attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert hasattr(layers[1], "_hf_hook") and hasattr(layers[3], "_hf_hook")
    logits, tokens, kept = run(dispatched, batch, config)
    assert kept == expected[2] and all(k < v for k, v in zip(kept, [3 * 17, 4 * 17]))
    torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=0)
    assert not torch.allclose(logits, untrimmed, atol=1e-3)  # trimming took effect under dispatch
    assert torch.equal(tokens, expected[1])


def test_device_map_auto_with_a_memory_budget_offloads_and_trims(tmp_path):
    """``device_map="auto"`` as a 90B user would load it, squeezed so most layers land on disk."""
    from transformers import MllamaForConditionalGeneration

    model, processor = tiny.random_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    batch = inputs(processor, BATCH)
    config = crosstrim.TrimConfig(k_ratio=0.25)
    expected = run(model, batch, config)
    auto = MllamaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "400KB"}, offload_folder=tmp_path / "offload"
    ).eval()
    assert "disk" in set(auto.hf_device_map.values()) and "cpu" in set(auto.hf_device_map.values())
    logits, tokens, kept = run(auto, batch, config)
    assert kept == expected[2]
    torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=0)
    assert torch.equal(tokens, expected[1])
