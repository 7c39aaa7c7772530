"""``TrimHandle.record_scores``: the first layer's scores, as the handle computed them, on request only."""

import pytest
import torch
from support import inputs, positions, text_model, valid_image_tokens

import crosstrim
from crosstrim import core as method
from crosstrim import tiny

BATCH = [
    ([2, 1], "<|image|> what is the color <|image|> of the circle ?"),
    ([4], "<|image|> how many shapes are there ?"),
    ([1, 1], "describe it <|image|> a red <|image|> left"),
]


@pytest.fixture(scope="module")
def batch(tiny_model):
    return inputs(tiny_model[1], BATCH)


def forward(model, batch):
    with torch.no_grad():
        return model(**batch, position_ids=positions(batch["attention_mask"]))


def eager_scores(processor, batch):
    """(B, H, N): the first cross layer's eager attention weights summed over the rows that may see an image."""
    eager_model, _ = tiny.random_model(seed=0, processor=processor)
    eager_model.set_attn_implementation("eager")
    first = min(text_model(eager_model).config.cross_attention_layers)
    captured = {}
    layer = text_model(eager_model).layers[first].cross_attn
    hook = layer.register_forward_hook(lambda m, a, out: captured.__setitem__("weights", out[1]))
    try:
        forward(eager_model, batch)
    finally:
        hook.remove()
    rows = batch["cross_attention_mask"].flatten(2).any(-1) & batch["attention_mask"].bool()
    return (captured["weights"] * rows[:, None, :, None]).sum(2)


def test_recorded_scores_are_the_first_layers_attention_and_what_selection_used(model, processor, batch):
    config = crosstrim.TrimConfig(k_ratio=0.1)
    with crosstrim.trimmed(model, config) as handle:
        assert handle.record_scores is False
        reference = forward(model, batch).logits
        kept = handle.stats.kept_indices
        assert handle.scores is None  # off by default: nothing is stored
        handle.record_scores = True
        logits = forward(model, batch).logits
        recorded = handle.scores
        assert torch.equal(logits, reference)  # recording changes nothing
        assert all(torch.equal(a, b) for a, b in zip(handle.stats.kept_indices, kept))
        handle.record_scores = False
        forward(model, batch)
        assert handle.scores is None  # the last prefill ran without recording
    tokens = handle.stats.image_tokens
    assert recorded.layer == min(text_model(model).config.cross_attention_layers)
    assert recorded.scores.shape == (3, 4, tokens) and recorded.scores.dtype == torch.float32
    assert torch.equal(recorded.valid, valid_image_tokens(batch, tokens))
    torch.testing.assert_close(recorded.scores, eager_scores(processor, batch), atol=1e-5, rtol=1e-5)
    # The kept tokens are the paper's rule applied to these scores, image by image.
    images = batch["pixel_values"].shape[1]
    per_image = tokens // images
    flat = recorded.scores.view(3, 4, images, per_image).transpose(1, 2).reshape(3 * images, 4, per_image)
    keep = method.union_topk(flat, recorded.valid.reshape(3 * images, per_image), 0.1).reshape(3, tokens)
    assert [k.tolist() for k in kept] == [row.nonzero().flatten().tolist() for row in keep]


@pytest.mark.parametrize(
    "config",
    [
        crosstrim.TrimConfig(keep_ratio=1.0),
        crosstrim.TrimConfig(method="random", keep_ratio=0.3),
        crosstrim.TrimConfig(method="uniform", keep_ratio=0.3, trim_first_layer_cache=True),
        crosstrim.TrimConfig(keep_ratio=0.3, summarize_dropped=True),
    ],
    ids=lambda c: c.describe(),
)
def test_methods_that_select_without_scores_record_the_same_scores(model, batch, config):
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)) as handle:
        handle.record_scores = True
        forward(model, batch)
        expected = handle.scores
    with crosstrim.trimmed(model, config) as handle:
        reference = forward(model, batch).logits
        handle.record_scores = True
        assert torch.equal(forward(model, batch).logits, reference)
    assert torch.equal(handle.scores.scores, expected.scores) and torch.equal(handle.scores.valid, expected.valid)


@pytest.mark.parametrize("mode", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_micro_batched_generate_records_what_a_one_shot_prefill_records(model, batch, mode):
    kwargs = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0, **mode}
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)) as handle:
        handle.record_scores = True
        model.generate(**batch, **kwargs)
        expected = handle.scores
        crosstrim.generate(model, prefill_batch_size=2, **batch, **kwargs)
        got = handle.scores
    assert got.scores.shape[0] == 3 * mode.get("num_beams", 1) == got.valid.shape[0]
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.valid, expected.valid) and got.layer == expected.layer
