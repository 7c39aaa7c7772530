"""Trimming a stock transformers Mllama: equivalence, batching, cache, generate, errors."""

import contextlib

import pytest
import torch
from support import (
    GENERATE_MODE_IDS,
    GENERATE_MODES,
    inputs,
    masked_reference,
    positions,
    summary_reference,
    text_model,
    valid_image_tokens,
)

import crosstrim
from crosstrim import core as method
from crosstrim import tiny
from crosstrim.engine import memory

# Three samples: two images (2 + 1 tiles, so padding tiles); one 4-tile image (left padded, so a
# padding image slot too); two 1-tile images after text, whose rows before the first image
# transformers leaves "fully masked". Samples with text before an image have the batch's largest
# image count: unpatched Mllama lets those rows attend uniformly to *every* image slot at the first
# cross layer, so a sample batched with more image slots than it has is not batch-invariant even
# without crosstrim (transformers behaviour, left as is).
BATCH = [
    ([2, 1], "<|image|> what is the color <|image|> of the circle ?"),
    ([4], "<|image|> how many shapes are there ?"),
    ([1, 1], "describe it <|image|> a red <|image|> left"),
]

CONFIGS = [
    crosstrim.TrimConfig(k_ratio=0.1),
    crosstrim.TrimConfig(k_ratio=0.25),
    crosstrim.TrimConfig(keep_ratio=0.3),
    crosstrim.TrimConfig(method="mean", keep_ratio=0.3),
    crosstrim.TrimConfig(method="random", keep_ratio=0.3, seed=3),
    crosstrim.TrimConfig(method="uniform", keep_ratio=0.3),
    crosstrim.TrimConfig(k_ratio=0.1, trim_first_layer_cache=True),
]
IDS = [c.describe() + (" first-cache" if c.trim_first_layer_cache else "") for c in CONFIGS]
RANDOM = CONFIGS[4]
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, position_ids=positions(batch["attention_mask"]), **kwargs)


@pytest.fixture(scope="module")
def batch(tiny_model):
    return inputs(tiny_model[1], BATCH)


@pytest.mark.parametrize(
    "config",
    [
        crosstrim.TrimConfig(k_ratio=1.0),
        crosstrim.TrimConfig(keep_ratio=1.0),
        crosstrim.TrimConfig(method="random", keep_ratio=1.0),
        crosstrim.TrimConfig(method="uniform", keep_ratio=1.0, trim_first_layer_cache=True),
        crosstrim.TrimConfig(k_ratio=1.0, summarize_dropped=True),
    ],
    ids=lambda c: c.describe(),
)
def test_ratio_one_is_the_identity_and_remove_restores(model, batch, config):
    reference = forward(model, batch).logits
    ref_tokens = model.generate(**batch, **GREEDY)
    with crosstrim.trimmed(model, config) as handle:
        assert torch.equal(forward(model, batch).logits, reference)
        assert torch.equal(model.generate(**batch, **GREEDY), ref_tokens)
        # Kept counts are over valid tokens (never above 100%); the cache still holds every slot.
        assert handle.stats.kept_counts == handle.stats.valid_counts
        assert all(len(i) == handle.stats.image_tokens for i in handle.stats.kept_indices)
        assert handle.stats.kv_bytes_kept == handle.stats.kv_bytes_full  # no summary token either
    assert torch.equal(forward(model, batch).logits, reference)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_trimmed_equals_masked_reference(model, batch, config):
    unpatched = forward(model, batch).logits
    with crosstrim.trimmed(model, config) as handle:
        logits = forward(model, batch).logits
        stats = handle.stats
        tokens = model.generate(**batch, **GREEDY)
        generate_stats = handle.stats  # generate's own prefill selects once, as the forward did
    assert all(torch.equal(a, b) for a, b in zip(generate_stats.kept_indices, stats.kept_indices))
    # The test is not vacuous: tokens were dropped and the logits moved.
    assert all(k < v for k, v in zip(stats.kept_counts, stats.valid_counts))
    assert not torch.allclose(logits, unpatched, atol=1e-3)
    first_layer_decode = config.trim_first_layer_cache
    with masked_reference(model, stats.kept_indices, stats.image_tokens):
        torch.testing.assert_close(logits, forward(model, batch).logits, atol=1e-5, rtol=0)
    with masked_reference(
        model, generate_stats.kept_indices, stats.image_tokens, first_layer_decode=first_layer_decode
    ):
        assert torch.equal(tokens, model.generate(**batch, **GREEDY))


@pytest.mark.parametrize(
    "config",
    [
        crosstrim.TrimConfig(k_ratio=0.1, summarize_dropped=True),
        crosstrim.TrimConfig(method="uniform", keep_ratio=0.3, summarize_dropped=True),
    ],
    ids=lambda c: c.describe(),
)
def test_summarize_dropped_equals_dropped_tokens_replaced_by_their_mean(model, batch, config):
    plain = crosstrim.TrimConfig(**{**config.__dict__, "summarize_dropped": False})
    with crosstrim.trimmed(model, plain):
        without = forward(model, batch).logits
    with crosstrim.trimmed(model, config) as handle:
        out = forward(model, batch, use_cache=True)
        stats = handle.stats
        tokens = model.generate(**batch, **GREEDY)
    assert not torch.allclose(out.logits, without, atol=1e-3)  # the summary tokens change the answer
    assert cross_cache_bytes(model, out.past_key_values) == stats.kv_bytes_kept
    images = batch["cross_attention_mask"].shape[2]
    assert stats.summary_tokens == images
    layers = sorted(text_model(model).config.cross_attention_layers)
    assert out.past_key_values.layers[layers[1]].keys.shape[2] == max(stats.kept_counts) + images
    valid = valid_image_tokens(batch, stats.image_tokens)
    with summary_reference(model, stats.kept_indices, valid, images):
        torch.testing.assert_close(out.logits, forward(model, batch).logits, atol=1e-5, rtol=0)
        assert torch.equal(tokens, model.generate(**batch, **GREEDY))


def test_rows_before_the_image_attend_only_kept_tokens(model, processor):
    """The quirk: fully masked rows attend uniformly; after trimming, uniformly to kept tokens only."""
    # Sample 1 keeps fewer tokens than sample 0, so its row is padded with masked slots.
    batch = inputs(processor, [([4], "<|image|> what is it ?"), ([1], "what is in the image <|image|> ?")])
    config = crosstrim.TrimConfig(k_ratio=0.1)
    with crosstrim.trimmed(model, config) as handle:
        logits = forward(model, batch).logits
    counts = handle.stats.kept_counts
    assert counts[1] < counts[0]
    with masked_reference(model, handle.stats.kept_indices, handle.stats.image_tokens):
        reference = forward(model, batch).logits
    before_image = slice(-6, -2)  # "what is in the" precede <|image|> in sample 1
    torch.testing.assert_close(logits[1, before_image], reference[1, before_image], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS[:6], ids=IDS[:6])
def test_batch_equals_each_sample_alone(model, processor, batch, config):
    def alone(b):
        return inputs(processor, [BATCH[b]], seed=10 * b)

    unpatched = forward(model, batch).logits
    for b in range(len(BATCH)):  # precondition: the unpatched model is batch-invariant here
        width = alone(b)["input_ids"].shape[1]
        torch.testing.assert_close(unpatched[b, -width:], forward(model, alone(b)).logits[0], atol=1e-5, rtol=0)
    with crosstrim.trimmed(model, config) as handle:
        logits = forward(model, batch).logits
        stats = handle.stats
        for b in range(len(BATCH)):
            single = forward(model, alone(b)).logits[0]
            assert torch.equal(handle.stats.kept_indices[0], stats.kept_indices[b])
            width = alone(b)["input_ids"].shape[1]
            torch.testing.assert_close(logits[b, -width:], single, atol=1e-5, rtol=0)


def cross_cache_bytes(model, cache) -> int:
    """Bytes the cache's cross-attention layers hold, counted from its tensors."""
    return memory.held_kv_bytes(cache, text_model(model).config.cross_attention_layers).cross_attn


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[-1]], ids=[IDS[1], IDS[-1]])
def test_cache_holds_kept_tokens_and_reported_bytes_are_measured_bytes(model, processor, batch, config):
    full = forward(model, batch, use_cache=True).past_key_values
    layers = sorted(text_model(model).config.cross_attention_layers)
    with crosstrim.trimmed(model, config) as handle:
        cache = forward(model, batch, use_cache=True).past_key_values
        stats = handle.stats
        for i in layers:
            expected = (
                stats.image_tokens if (i == layers[0] and not config.trim_first_layer_cache) else max(stats.kept_counts)
            )
            assert cache.layers[i].keys.shape[2] == cache.layers[i].values.shape[2] == expected
        assert cross_cache_bytes(model, cache) == stats.kv_bytes_kept
        assert cross_cache_bytes(model, full) == stats.kv_bytes_full
        alone = inputs(processor, [BATCH[1]], seed=10)
        cache = forward(model, alone, use_cache=True).past_key_values
        assert cache.layers[layers[1]].keys.shape[2] == handle.stats.kept_counts[0] == stats.kept_counts[1]


def test_selection_matches_eager_attention_weights(processor, batch):
    """Scores beside sdpa == the first cross layer's eager weights, summed over the rows that count."""
    sdpa_model, _ = tiny.random_model(seed=0, processor=processor)
    eager_model, _ = tiny.random_model(seed=0, processor=processor)
    eager_model.set_attn_implementation("eager")
    first = min(text_model(eager_model).config.cross_attention_layers)
    captured = {}
    hook = (
        text_model(eager_model)
        .layers[first]
        .cross_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("weights", out[1]))
    )
    forward(eager_model, batch)
    hook.remove()
    weights = captured["weights"]  # (B, H, L, N)
    with crosstrim.trimmed(sdpa_model, crosstrim.TrimConfig(k_ratio=0.2)) as handle:
        forward(sdpa_model, batch)
    # Rows that count: the ones that may attend an image, minus padding.
    cross = batch["cross_attention_mask"].flatten(2).any(-1) & batch["attention_mask"].bool()
    scores = (weights * cross[:, None, :, None]).sum(2)
    valid = torch.zeros(weights.shape[0], weights.shape[-1], dtype=torch.bool)
    tiles = batch["cross_attention_mask"].amax(1).flatten(1).bool()  # (B, images*tiles)
    valid = tiles.repeat_interleave(weights.shape[-1] // tiles.shape[1], dim=1)
    images, per_image = batch["pixel_values"].shape[1], weights.shape[-1] // batch["pixel_values"].shape[1]
    flat = scores.view(3, -1, images, per_image).transpose(1, 2).reshape(3 * images, -1, per_image)
    keep = method.union_topk(flat, valid.reshape(3 * images, per_image), 0.2).reshape(3, -1)
    for b in range(3):
        assert torch.equal(handle.stats.kept_indices[b], keep[b].nonzero().flatten())


@pytest.mark.parametrize("config", [crosstrim.TrimConfig(k_ratio=0.2), RANDOM], ids=lambda c: c.describe())
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_influences_selection(model, processor, side, config):
    """Different pad tokens and different padding-tile features leave the selection unchanged.

    Right padding after the image is allowed by the cross-attention mask, so only the 2-D
    attention_mask keeps those rows out of the scores.
    """
    processor.tokenizer.padding_side = side
    try:
        batch = inputs(processor, [([2], "<|image|> what is the color of the circle ?"), ([1], "<|image|> it ?")])
    finally:
        processor.tokenizer.padding_side = "left"
    pad_rows = batch["attention_mask"] == 0
    assert pad_rows.any()
    if side == "right":
        assert batch["cross_attention_mask"][pad_rows].any()
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    padding_tiles = dict(batch, pixel_values=batch["pixel_values"].clone())
    padding_tiles["pixel_values"][:, :, 2:] = torch.randn_like(padding_tiles["pixel_values"][:, :, 2:])
    with crosstrim.trimmed(model, config) as handle:
        kept = []
        for variant in (batch, other, padding_tiles):
            forward(model, variant)
            kept.append(handle.stats.kept_indices)
    tiles_of = 2 * 17  # sample 0 has 2 real tiles of 17 tokens; nothing beyond may be kept
    assert all(int(k.max()) < tiles_of for k in kept[0])
    for variant in kept[1:]:
        assert all(torch.equal(a, b) for a, b in zip(kept[0], variant))


def test_random_keeps_what_the_sample_alone_keeps_in_any_batch_padding_or_call_order(model, processor):
    """The random baseline draws from the sample itself: its token ids and its image layout."""
    sample = BATCH[0]  # two images (2 + 1 tiles)
    partners = [
        ([4], "<|image|> how many shapes are there in the image ? describe it"),  # longer: pads the sample
        ([1, 1, 1], "<|image|> it <|image|> a <|image|> ?"),  # more images: adds an empty image slot
        ([1], "<|image|> it ?"),
    ]

    def run(samples, where, side):
        processor.tokenizer.padding_side = side
        try:
            batch = inputs(processor, samples, seed=100 - 10 * where)  # the sample's images are the same everywhere
        finally:
            processor.tokenizer.padding_side = "left"
        width = int(batch["attention_mask"][where].sum())
        logits = forward(model, batch).logits[where]
        return handle.stats.kept_indices[where], logits[-width:] if side == "left" else logits[:width]

    with crosstrim.trimmed(model, RANDOM) as handle:
        kept, logits = run([sample], 0, "left")
        assert 0 < len(kept) < handle.stats.valid_counts[0]
        for partner in partners:
            for where, side in [(0, "left"), (1, "left"), (0, "right"), (1, "right")]:
                batch = [sample, partner] if where == 0 else [partner, sample]
                got, got_logits = run(batch, where, side)
                assert torch.equal(got, kept), (partner, where, side)
                torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=0)
        assert torch.equal(run([sample], 0, "left")[0], kept)  # nothing carried over from earlier calls
        other_prompt = run([([2, 1], "<|image|> what is the shape <|image|> of the circle ?")], 0, "left")[0]
    assert not torch.equal(other_prompt, kept)
    with crosstrim.trimmed(model, crosstrim.TrimConfig(method="random", keep_ratio=0.3, seed=4)) as handle:
        other_seed = run([sample], 0, "left")[0]
    assert not torch.equal(other_seed, kept)


@pytest.mark.parametrize("mode", GENERATE_MODES, ids=GENERATE_MODE_IDS)
def test_generate_modes_match_the_masked_reference(model, batch, mode):
    kwargs = {"max_new_tokens": 5, "pad_token_id": 0, **mode}
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)) as handle:
        torch.manual_seed(0)
        trimmed_tokens = model.generate(**batch, **kwargs)
        stats = handle.stats
    rows = len(BATCH) * mode.get("num_beams", 1) * (1 if mode.get("num_beams") else mode.get("num_return_sequences", 1))
    assert len(stats.kept_counts) == rows
    with masked_reference(model, stats.kept_indices, stats.image_tokens):
        torch.manual_seed(0)
        assert torch.equal(trimmed_tokens, model.generate(**batch, **kwargs))


def image_less_sample(processor):
    """A batch where sample 1 has no image, as transformers 5's processor builds it (4.57's refuses):
    its tile mask and aspect ratio are zero, so every row of it is "fully masked"."""
    mixed = inputs(processor, [([2], "<|image|> what is it ?"), ([1], "<|image|> what is it ?")])
    for key in ("cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
        mixed[key][1] = 0
    return mixed


@contextlib.contextmanager
def zero_features_at_later_layers(model, rows):
    """The unpatched model with ``rows``' image features zeroed in the later cross-attention layers."""
    text = text_model(model)
    layers = sorted(text.config.cross_attention_layers)

    def hook(layer, args, kwargs):
        states = kwargs.get("cross_attention_states")
        if states is None:
            return None
        states = states.reshape(len(kwargs["cross_attention_mask"]), -1, states.shape[-1]).clone()
        states[rows] = 0
        return args, dict(kwargs, cross_attention_states=states)

    handles = [text.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers[1:]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_text_only_prompts_pass_through(model, processor):
    text = processor(text=["what is in the image ?"], return_tensors="pt")
    with torch.no_grad():
        reference = model(**text).logits
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)) as handle:
        assert torch.equal(forward(model, text).logits, reference)
        assert handle.stats is None


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[-1]], ids=[IDS[0], IDS[-1]])
def test_an_image_less_sample_keeps_nothing_and_the_batch_stays_trimmed(model, processor, config):
    """Issue #11 item 1 (changed behaviour: an image-less sample used to keep all N tokens, so the
    whole batch ran at full width). Now it keeps none; the batch keeps the width of its image samples,
    the image-less rows read zero features (nothing) in the trimmed layers, and every byte reported is
    a byte held."""
    mixed = image_less_sample(processor)
    layers = sorted(text_model(model).config.cross_attention_layers)
    with crosstrim.trimmed(model, config) as handle:
        out = forward(model, mixed, use_cache=True)
        stats = handle.stats
        tokens = model.generate(**mixed, **GREEDY)
    assert stats.valid_counts[1] == stats.kept_counts[1] == 0 and len(stats.kept_indices[1]) == 0
    assert 0 < stats.kept_counts[0] < stats.valid_counts[0]
    for i in layers if config.trim_first_layer_cache else layers[1:]:
        assert out.past_key_values.layers[i].keys.shape[2] == stats.kept_counts[0]
    assert cross_cache_bytes(model, out.past_key_values) == stats.kv_bytes_kept < stats.kv_bytes_full
    assert torch.isfinite(out.logits).all()
    # The image sample: what the masked reference computes. The image-less sample: what the unpatched
    # model computes with zero features in the later layers (their attention adds nothing there).
    with (
        masked_reference(model, stats.kept_indices, stats.image_tokens),
        zero_features_at_later_layers(model, [1]),
    ):
        torch.testing.assert_close(out.logits, forward(model, mixed).logits, atol=1e-5, rtol=0)
        if not config.trim_first_layer_cache:  # the first layer's decode cache keeps every token
            assert torch.equal(tokens, model.generate(**mixed, **GREEDY))
    # Per sample, the bytes each holds alone: the image sample its kept tokens, the text-only one none.
    image_alone = inputs(processor, [([2], "<|image|> what is it ?")])
    text_alone = processor(text=["what is it ?"], return_tensors="pt")
    full_image = forward(model, image_alone, use_cache=True).past_key_values
    with crosstrim.trimmed(model, config) as handle:
        kept_image = forward(model, image_alone, use_cache=True).past_key_values
        assert torch.equal(handle.stats.kept_indices[0], stats.kept_indices[0])
        kept_text = forward(model, text_alone, use_cache=True).past_key_values
    assert stats.sample_kv_bytes(0) == (cross_cache_bytes(model, full_image), cross_cache_bytes(model, kept_image))
    assert stats.sample_kv_bytes(1) == (0, 0)
    held = kept_text.layers  # a text-only prompt caches no image token (4.57 may not even create the layers)
    assert all(i >= len(held) or getattr(held[i], "keys", None) is None for i in layers)


def test_a_batch_without_any_image_keeps_one_masked_slot_and_no_nan(model, processor):
    nothing = image_less_sample(processor)
    for key in ("cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
        nothing[key][0] = 0
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)) as handle:
        out = forward(model, nothing, use_cache=True)
        assert model.generate(**nothing, **GREEDY).shape[1] == nothing["input_ids"].shape[1] + 6
    assert handle.stats.kept_counts == (0, 0) and handle.stats.mean_kept_fraction == 1.0
    assert torch.isfinite(out.logits).all()
    layers = sorted(text_model(model).config.cross_attention_layers)
    assert out.past_key_values.layers[layers[1]].keys.shape[2] == 1
    with zero_features_at_later_layers(model, [0, 1]):
        torch.testing.assert_close(out.logits, forward(model, nothing).logits, atol=1e-5, rtol=0)


def test_bad_models_and_misuse_raise_clear_errors(model, processor, batch):
    with pytest.raises(TypeError, match="Mllama"):
        crosstrim.trim(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="whole vision-language model"):
        crosstrim.trim(text_model(model))
    with pytest.raises(TypeError, match="TrimConfig"):
        crosstrim.trim(model, {"k_ratio": 0.5})
    no_cross, _ = tiny.random_model(seed=0, processor=processor, cross_attention_layers=[])
    with pytest.raises(ValueError, match="no cross-attention layers"):
        crosstrim.trim(no_cross)
    with crosstrim.trimmed(model):
        with pytest.raises(ValueError, match="already trimmed"):
            crosstrim.trim(model)
        with pytest.raises(ValueError, match="dynamic cache"):
            model.generate(**batch, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
        no_mask = {k: v for k, v in batch.items() if k != "cross_attention_mask"}
        with pytest.raises(ValueError, match="cross_attention_mask"), torch.no_grad():
            model(**no_mask)
    embedded = {k: v for k, v in batch.items() if k != "input_ids"}
    embedded["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"])
    refused = pytest.raises(ValueError, match="call the model with input_ids")
    with crosstrim.trimmed(model, RANDOM), refused, torch.no_grad():
        model(**embedded)
    handle = crosstrim.trim(model)  # trimming again after removal works
    handle.remove()
    assert not handle.active


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[-1]], ids=[IDS[0], IDS[-1]])
def test_manual_decode_with_the_returned_cache(model, batch, config):
    """A forward prefill followed by hand-written decode steps reuses the stored selection."""

    def run_two_steps():
        out = forward(model, batch, use_cache=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        cross = batch["cross_attention_mask"]
        logits = []
        cache = out.past_key_values
        for _ in range(2):
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)
            with torch.no_grad():
                out = model(
                    input_ids=next_ids,
                    attention_mask=mask,
                    cross_attention_mask=cross[:, -1:],
                    past_key_values=cache,
                    position_ids=positions(mask)[:, -1:],
                    use_cache=True,
                )
            logits.append(out.logits)
        return torch.cat(logits, 1)

    with crosstrim.trimmed(model, config) as handle:
        trimmed_logits = run_two_steps()
        stats = handle.stats
    with masked_reference(
        model, stats.kept_indices, stats.image_tokens, first_layer_decode=config.trim_first_layer_cache
    ):
        torch.testing.assert_close(trimmed_logits, run_two_steps(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        crosstrim.TrimConfig(k_ratio=0.1),
        crosstrim.TrimConfig(k_ratio=1.0),
        crosstrim.TrimConfig(keep_ratio=0.3, summarize_dropped=True),
        crosstrim.TrimConfig(k_ratio=0.1, trim_first_layer_cache=True),
    ],
    ids=lambda c: c.describe() + (" first-cache" if c.trim_first_layer_cache else ""),
)
def test_per_sample_kv_bytes_equal_the_cache_of_that_sample_alone(model, processor, batch, config):
    """Alone and inside BATCH, whose rows have two image slots although sample 1 has one image: the bytes
    reported for a sample are those it holds run alone, not the slots or kept-slot padding the batch adds."""
    with crosstrim.trimmed(model, config) as handle:
        forward(model, batch)
        in_batch = handle.stats
    assert in_batch.image_counts == (2, 1, 2) and in_batch.image_slots == 2
    for b in range(len(BATCH)):
        alone = inputs(processor, [BATCH[b]], seed=10 * b)
        full_cache = forward(model, alone, use_cache=True).past_key_values
        with crosstrim.trimmed(model, config) as handle:
            cache = forward(model, alone, use_cache=True).past_key_values
        measured = (cross_cache_bytes(model, full_cache), cross_cache_bytes(model, cache))
        assert handle.stats.sample_kv_bytes(0) == measured
        assert in_batch.sample_kv_bytes(b) == measured


def test_torch_compile_graph_breaks_around_selection_and_matches_eager(model, batch):
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1)) as handle:
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            logits = compiled(**batch).logits
            eager = model(**batch).logits
        assert handle.stats.kept_counts[0] < handle.stats.valid_counts[0]
        torch.testing.assert_close(logits, eager, atol=1e-5, rtol=0)
        assert torch.equal(compiled.generate(**batch, **GREEDY), model.generate(**batch, **GREEDY))


def test_stats_after_a_text_only_call_describe_that_call(model, processor):
    """Stats belong to the last prefill: a text-only call after an image call has kept nothing (None), and
    its recorded scores are gone too."""
    batch = inputs(processor, [([1], "<|image|> what is the color of the circle ?")])
    text = processor(text=["what is in the image ?"], return_tensors="pt")
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.25)) as handle:
        handle.record_scores = True
        model.generate(**batch, max_new_tokens=2, pad_token_id=0)
        assert handle.stats is not None and handle.scores is not None
        model.generate(**text, max_new_tokens=2, pad_token_id=0)
        assert handle.stats is None and handle.scores is None
        with torch.no_grad():
            model(**batch)
        assert handle.stats is not None
        with torch.no_grad():
            model(**text, use_cache=False)
        assert handle.stats is None
