"""crosstrim.generate: micro-batched prefill, then transformers' own decoding, equals model.generate."""

import dataclasses

import pytest
import torch
from support import GENERATE_MODE_IDS, GENERATE_MODES, inputs, text_model

import crosstrim
from crosstrim import tiny
from crosstrim.engine import memory

# Three samples, so a prefill batch of 2 splits them unevenly (2 + 1): two images (2 + 1 tiles, so
# padding tiles); one 4-tile image (left padded, an empty image slot); two 1-tile images after text.
TWO_IMAGES = [
    ([2, 1], "<|image|> what is the color <|image|> of the circle ?"),
    ([4], "<|image|> how many shapes are there ?"),
    ([1, 1], "describe it <|image|> a red <|image|> left"),
]
ONE_IMAGE = [
    ([1], "<|image|> what is the color of the circle ?"),
    ([4], "<|image|> how many shapes ?"),
    ([2], "<|image|> describe it"),
]
CONFIGS = [
    None,
    crosstrim.TrimConfig(k_ratio=1.0),  # the identity caches padding-tile slots too: the stats must say so
    crosstrim.TrimConfig(k_ratio=0.1),
    crosstrim.TrimConfig(keep_ratio=0.3),
    crosstrim.TrimConfig(method="mean", keep_ratio=0.3),
    crosstrim.TrimConfig(method="random", keep_ratio=0.3, seed=3),
    crosstrim.TrimConfig(method="uniform", keep_ratio=0.3),
    crosstrim.TrimConfig(k_ratio=0.1, summarize_dropped=True),
    crosstrim.TrimConfig(k_ratio=0.1, trim_first_layer_cache=True),
]


def describe(config):
    if config is None:
        return "full"
    return config.describe() + (" first-cache" if config.trim_first_layer_cache else "")


GREEDY = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
DETAILED = {"return_dict_in_generate": True, "output_logits": True, "output_scores": True}


def trim_context(model, config):
    return crosstrim.trimmed(model, config) if config is not None else _no_trim()


class _no_trim:
    stats = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_same_stats(got, expected):
    assert (got is None) == (expected is None)
    if expected is None:
        return
    for field in dataclasses.fields(expected):
        a, b = getattr(got, field.name), getattr(expected, field.name)
        if field.name == "kept_indices":
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        else:
            assert a == b, field.name


def run_both(model, batch, config, prefill_batch_size=2, **kwargs):
    """(one-shot output, its stats, micro-batched output, its stats), same seed before each."""
    with trim_context(model, config) as handle:
        torch.manual_seed(0)
        expected = model.generate(**batch, **kwargs)
        expected_stats = handle.stats
        torch.manual_seed(0)
        got = crosstrim.generate(model, prefill_batch_size=prefill_batch_size, **batch, **kwargs)
        got_stats = handle.stats
    assert "forward" not in vars(model)  # the first-step answer is gone
    return expected, expected_stats, got, got_stats


def assert_same_output(got, expected):
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences)
    for name in ("logits", "scores"):
        assert len(getattr(got, name)) == len(getattr(expected, name))
        for a, b in zip(getattr(got, name), getattr(expected, name)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def cross_layers(model):
    return sorted(text_model(model).config.cross_attention_layers)


@pytest.fixture(scope="module")
def two_images(tiny_model):
    return inputs(tiny_model[1], TWO_IMAGES)


@pytest.mark.parametrize("config", CONFIGS, ids=describe)
def test_greedy_equals_one_shot_generate(model, two_images, config):
    expected, expected_stats, got, stats = run_both(model, two_images, config, **GREEDY, **DETAILED)
    assert_same_output(got, expected)
    assert_same_stats(stats, expected_stats)
    held = memory.held_kv_bytes(got.past_key_values, cross_layers(model)).cross_attn
    assert held == memory.held_kv_bytes(expected.past_key_values, cross_layers(model)).cross_attn
    if config is not None:
        assert held == stats.kv_bytes_kept
    if config is not None and not config.is_identity:
        # Not vacuous: tokens were dropped, and the micro-batches kept different widths, so the
        # second one was padded to the first one's when the caches were merged.
        assert all(k < v for k, v in zip(stats.kept_counts, stats.valid_counts))
        assert max(stats.kept_counts[:2]) != stats.kept_counts[2]


@pytest.mark.parametrize(
    "config", [None, crosstrim.TrimConfig(k_ratio=0.25), crosstrim.TrimConfig(method="random", keep_ratio=0.3)]
)
@pytest.mark.parametrize("prefill_batch_size", [1, 2])
def test_one_image_per_sample(model, processor, config, prefill_batch_size):
    batch = inputs(processor, ONE_IMAGE, seed=5)
    expected, expected_stats, got, stats = run_both(
        model, batch, config, prefill_batch_size=prefill_batch_size, **GREEDY, **DETAILED
    )
    assert_same_output(got, expected)
    assert_same_stats(stats, expected_stats)


@pytest.mark.parametrize("mode", GENERATE_MODES, ids=GENERATE_MODE_IDS)
def test_generate_modes_equal_one_shot(model, two_images, mode):
    config = crosstrim.TrimConfig(k_ratio=0.1, summarize_dropped=True)
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0, **mode}
    expected, expected_stats, got, stats = run_both(model, two_images, config, **kwargs)
    assert torch.equal(got, expected)
    rows = len(TWO_IMAGES) * max(mode.get("num_beams", 1), mode.get("num_return_sequences", 1))
    assert len(stats.kept_counts) == rows
    assert_same_stats(stats, expected_stats)


def test_small_batches_and_text_only_go_straight_to_generate(model, processor, two_images):
    expected, _, got, _ = run_both(model, two_images, None, prefill_batch_size=3, **GREEDY)
    assert torch.equal(got, expected)
    text = processor(text=["what is in the image ?", "describe it"], return_tensors="pt", padding=True)
    expected, _, got, _ = run_both(model, text, crosstrim.TrimConfig(k_ratio=0.1), prefill_batch_size=1, **GREEDY)
    assert torch.equal(got, expected)


def test_bad_arguments_raise_clear_errors(model, processor, two_images):
    def call(error, match, prefill_batch_size=1, target=model, **kwargs):
        with pytest.raises(error, match=match):
            crosstrim.generate(target, prefill_batch_size=prefill_batch_size, **{**two_images, **GREEDY, **kwargs})
        assert "forward" not in vars(model)

    call(ValueError, "prefill_batch_size must be >= 1", prefill_batch_size=0)
    call(TypeError, "prefill_batch_size must be an int", prefill_batch_size=True)
    call(TypeError, "MllamaForConditionalGeneration", target=torch.nn.Linear(2, 2))
    call(TypeError, "MllamaForConditionalGeneration", target=text_model(model))
    call(ValueError, "drop cache", cache=object())
    call(ValueError, "drop past_key_values", past_key_values=object())
    call(ValueError, "cache_implementation='static'", cache_implementation="static")
    call(ValueError, "use_cache=False", use_cache=False)
    call(ValueError, "assisted decoding", prompt_lookup_num_tokens=2)
    call(ValueError, "output_attentions", output_attentions=True, return_dict_in_generate=True)
    call(ValueError, "inputs_embeds", inputs_embeds=torch.zeros(3, 2, 4))
    call(ValueError, "attention_mask", attention_mask=None)
    call(ValueError, r"pixel_values must have one row per sample \(3\)", pixel_values=two_images["pixel_values"][:2])
    # An error inside generate itself leaves the model's forward as it was.
    call(ValueError, "max_new_tokens", max_new_tokens=-1)


def test_a_second_model_is_not_affected(processor, two_images):
    """The first-step answer is installed on the model instance only, and only during the call."""
    first, _ = tiny.random_model(seed=0, processor=processor)
    second, _ = tiny.random_model(seed=1, processor=processor)
    expected = second.generate(**two_images, **GREEDY)
    crosstrim.generate(first, prefill_batch_size=1, **two_images, **GREEDY)
    assert torch.equal(second.generate(**two_images, **GREEDY), expected)


def test_one_new_token_and_beams_from_a_generation_config(model, two_images):
    from transformers import GenerationConfig

    config = crosstrim.TrimConfig(keep_ratio=0.3)
    expected, _, got, _ = run_both(model, two_images, config, max_new_tokens=1, pad_token_id=0, **DETAILED)
    assert_same_output(got, expected)
    beams = GenerationConfig(num_beams=2, do_sample=False, max_new_tokens=3, pad_token_id=0)
    expected, expected_stats, got, stats = run_both(model, two_images, config, generation_config=beams)
    assert torch.equal(got, expected)
    assert len(stats.kept_counts) == 2 * len(TWO_IMAGES)
    assert_same_stats(stats, expected_stats)


def test_an_image_less_sample_in_a_micro_batch_of_its_own(model, processor):
    """A sample without an image (zero tile mask and aspect ratio, as transformers 5's processor builds
    it) keeps nothing: its micro-batch's trimmed layers hold one masked slot, the other's its kept tokens,
    and the merged cache is as wide as the one-shot batch's."""
    batch = inputs(processor, ONE_IMAGE, seed=5)
    for key in ("cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
        batch[key][2] = 0
    config = crosstrim.TrimConfig(k_ratio=0.1)
    expected, expected_stats, got, stats = run_both(model, batch, config, **GREEDY, **DETAILED)
    assert_same_output(got, expected)
    assert_same_stats(stats, expected_stats)
    assert stats.valid_counts[2] == 0 == stats.kept_counts[2] and len(stats.kept_indices[2]) == 0
    assert min(stats.kept_counts[:2]) > 0


def test_untrimmed_layers_are_merged_in_place_and_each_micro_batch_released():
    """The merged cache gets whole-batch room for the layers every micro-batch shares, and each micro-batch's
    tensors are dropped as soon as they are copied: the prefill never holds such a layer twice."""
    from types import SimpleNamespace

    from crosstrim.engine.generation import _CacheMerger

    def cache(rows, seed):
        torch.manual_seed(seed)
        shared = SimpleNamespace(keys=torch.randn(rows, 2, 5, 3), values=torch.randn(rows, 2, 5, 3))
        return SimpleNamespace(layers=[shared])

    first, second = cache(2, 0), cache(1, 1)
    expected = torch.cat([first.layers[0].keys, second.layers[0].keys])
    merger = _CacheMerger(batch=3, trimmed=set())
    merger.add(first, 0)
    room = first.layers[0].keys
    assert room.shape[0] == 3  # allocated for the whole batch at the first micro-batch
    merger.add(second, 2)
    assert second.layers[0].keys is None and second.layers[0].values is None  # released once copied
    merged = merger.finish([None, None])
    assert merged is first and merged.layers[0].keys is room  # filled in place, never concatenated
    assert torch.equal(merged.layers[0].keys, expected)


def test_an_unset_generation_config_field_comes_from_the_models_config(model, two_images):
    """As model.generate reads it: a passed GenerationConfig(max_new_tokens=3) leaves num_beams unset, so the
    model's num_beams=2 applies, to the micro-batched prefill's expansion too (was a shape error deep inside)."""
    from transformers import GenerationConfig

    passed = GenerationConfig(max_new_tokens=3, pad_token_id=0)
    saved = model.generation_config
    model.generation_config = GenerationConfig(num_beams=2, do_sample=False, pad_token_id=0)
    try:
        for config in (None, crosstrim.TrimConfig(keep_ratio=0.3)):
            expected, expected_stats, got, stats = run_both(model, two_images, config, generation_config=passed)
            assert torch.equal(got, expected)
            assert_same_stats(stats, expected_stats)
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("config", [None, crosstrim.TrimConfig(k_ratio=0.1)], ids=describe)
def test_concurrent_calls_on_one_model_each_get_their_own_tokens(model, processor, config):
    """Threads sharing one model: every call's tokens equal its single-thread answer (the model is never
    modified during a call, so no call answers another's first step)."""
    import threading

    prompts = [inputs(processor, TWO_IMAGES, seed=seed) for seed in range(4)]
    with trim_context(model, config):
        alone = [crosstrim.generate(model, prefill_batch_size=1, **batch, **GREEDY) for batch in prompts]
        results: dict[int, list] = {i: [] for i in range(len(prompts))}
        start = threading.Barrier(len(prompts))

        def work(i: int) -> None:
            start.wait()
            for _ in range(3):
                try:
                    results[i].append(crosstrim.generate(model, prefill_batch_size=1, **prompts[i], **GREEDY))
                except Exception as error:  # a deep error is as wrong as wrong tokens
                    results[i].append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert "forward" not in vars(model)
    for i, outputs in results.items():
        assert len(outputs) == 3
        for out in outputs:
            assert isinstance(out, torch.Tensor), out
            assert torch.equal(out, alone[i])
