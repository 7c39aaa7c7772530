"""Issue #11: a trimmed model never silently stops trimming and never breaks where the stock model runs.

Copies, static caches at ratio 1.0, generate without a cache, threads, exceptions, training mode,
padding slots at decode, and transformers drift (simulated by renaming what crosstrim reads).
"""

import copy
import gc
import math
import threading
import weakref

import pytest
import torch
import transformers
from support import inputs, masked_reference, positions, text_model
from transformers.models.mllama import modeling_mllama

import crosstrim
from crosstrim import tiny

SAMPLES = [
    ([2, 1], "<|image|> what is the color <|image|> of the circle ?"),
    ([4], "<|image|> how many shapes are there ?"),
    ([1, 1], "describe it <|image|> a red <|image|> left"),
]
CONFIG = crosstrim.TrimConfig(k_ratio=0.1)
GREEDY = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
DRIFT = f"transformers {transformers.__version__}"


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, position_ids=positions(batch["attention_mask"]), **kwargs)


def cross_layers(model) -> list[int]:
    return sorted(text_model(model).config.cross_attention_layers)


@pytest.fixture(scope="module")
def batch(tiny_model):
    return inputs(tiny_model[1], SAMPLES)


@pytest.fixture
def fresh(processor):
    """A model of its own, for tests that change modules or classes (the session model stays untouched)."""
    return tiny.random_model(seed=0, processor=processor)[0]


def decode(model, batch, steps: int = 2) -> torch.Tensor:
    """Prefill, then ``steps`` greedy decode steps with the returned cache; the logits of every step."""
    out = forward(model, batch, use_cache=True)
    mask, cache, logits = batch["attention_mask"], out.past_key_values, [out.logits[:, -1:]]
    for _ in range(steps):
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(next_ids)], 1)
        with torch.no_grad():
            out = model(
                input_ids=next_ids,
                attention_mask=mask,
                cross_attention_mask=batch["cross_attention_mask"][:, -1:],
                past_key_values=cache,
                position_ids=positions(mask)[:, -1:],
                use_cache=True,
            )
        logits.append(out.logits)
    return torch.cat(logits, 1)


# -- item 2: copies ------------------------------------------------------------------------------


def test_a_deepcopy_of_a_trimmed_model_is_trimmed_by_its_own_handle(model, batch):
    with crosstrim.trimmed(model, CONFIG) as handle:
        expected_tokens = model.generate(**batch, **GREEDY)
        expected = forward(model, batch).logits
        stats = handle.stats
        twin = copy.deepcopy(model)
    own = crosstrim.TrimHandle.of(twin)
    assert own is not None and own is not handle and own.model is twin and own.active
    assert crosstrim.TrimHandle.of(model) is None  # the original was removed; the copy stays trimmed
    assert own.stats is None  # a copy starts without the original's calls
    assert torch.equal(forward(twin, batch).logits, expected)
    assert all(torch.equal(a, b) for a, b in zip(own.stats.kept_indices, stats.kept_indices))
    assert torch.equal(twin.generate(**batch, **GREEDY), expected_tokens)
    assert handle.stats is stats  # the copy's calls never reach the original handle
    own.remove()
    assert torch.equal(forward(twin, batch).logits, forward(model, batch).logits)


# -- item 3: ratio 1.0 with a static cache ----------------------------------------------------------


def test_ratio_one_runs_with_a_static_cache_as_the_identity(fresh, batch):
    model = fresh  # generate keeps a static cache on the model: not on the shared one
    static = {**GREEDY, "cache_implementation": "static"}
    try:
        reference = model.generate(**batch, **static)
    except IndexError:  # transformers 4.57's static cache cannot hold Mllama's cross-attention states at all
        pytest.skip(f"the stock Mllama model cannot generate with a static cache on {DRIFT}")
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=1.0)) as handle:
        assert torch.equal(model.generate(**batch, **static), reference)
        assert handle.stats.kept_counts == handle.stats.valid_counts  # kept over valid tokens: all of them
        assert all(len(i) == handle.stats.image_tokens for i in handle.stats.kept_indices)  # every slot cached
    with crosstrim.trimmed(model, CONFIG), pytest.raises(ValueError, match="dynamic cache"):
        model.generate(**batch, **static)  # a trimming ratio still refuses the pre-allocated cache


# -- a fixed budget with a static cache, eager and compiled (issue 18) -----------------------------------


@pytest.fixture(scope="module")
def stock_static_cache(tiny_model, batch):
    """Skip where the unpatched model cannot generate with a static cache at all (transformers 4.57's static
    cache cannot hold Mllama's cross-attention states): there is nothing for crosstrim to size or refuse."""
    stock = tiny.random_model(seed=0, processor=tiny_model[1])[0]
    try:
        stock.generate(**batch, **GREEDY, cache_implementation="static")
    except IndexError as err:
        pytest.skip(f"the stock Mllama model cannot generate with a static cache on {DRIFT} ({err})")


FIXED = [
    crosstrim.TrimConfig(keep_ratio=0.3),
    crosstrim.TrimConfig(keep_ratio=0.3, summarize_dropped=True),
    crosstrim.TrimConfig(method="random", keep_ratio=0.5, seed=1),
]


def fixed_width(model, config, images):
    """Kept slots of a static cache: every image slot's budget with all its tiles valid, plus summaries."""
    vision = model.config.vision_config
    slot = vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)
    return images * (math.ceil(config.keep_ratio * slot - 1e-6) + (1 if config.summarize_dropped else 0))


@pytest.mark.parametrize("config", FIXED, ids=lambda c: c.describe())
@pytest.mark.usefixtures("stock_static_cache")
def test_a_fixed_budget_allocates_the_static_cache_at_its_width_and_decodes_the_same(model, batch, config):
    static = {**GREEDY, "cache_implementation": "static", "return_dict_in_generate": True}
    layers = sorted(model.config.text_config.cross_attention_layers)
    with crosstrim.trimmed(model, config) as handle:
        dynamic = model.generate(**batch, **GREEDY)
        out = model.generate(**batch, **static)
    assert torch.equal(out.sequences, dynamic)
    images = batch["pixel_values"].shape[1]
    widths = [out.cache.layers[idx].keys.shape[-2] for idx in layers]
    assert widths == [handle.stats.image_tokens] + [fixed_width(model, config, images)] * (len(layers) - 1)
    assert widths[1] > max(handle.stats.kept_counts)  # images with fewer tiles: masked slots


@pytest.mark.usefixtures("stock_static_cache")
def test_a_fixed_budget_decodes_the_same_under_torch_compile(fresh, batch):
    """generate compiles the decode step for a static cache (CPU: compile_config with _compile_all_devices);
    the hooks trace into one graph. Backend "eager" keeps the test fast; the bench runs inductor."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    static = {**GREEDY, "cache_implementation": "static"}
    with crosstrim.trimmed(fresh, FIXED[0]):
        dynamic = fresh.generate(**batch, **GREEDY)
        counters.clear()
        compiled = fresh.generate(**batch, **static, compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step ran compiled
    assert torch.equal(compiled, dynamic)


@pytest.mark.usefixtures("stock_static_cache")
def test_a_static_cache_is_refused_where_the_width_is_not_known_before_the_prefill(model, batch):
    static = {**GREEDY, "cache_implementation": "static"}
    with crosstrim.trimmed(model, CONFIG), pytest.raises(ValueError, match=r"k_ratio keeps .*Use keep_ratio"):
        model.generate(**batch, **static)
    first = crosstrim.TrimConfig(keep_ratio=0.3, trim_first_layer_cache=True)
    with crosstrim.trimmed(model, first), pytest.raises(ValueError, match="trim_first_layer_cache cuts"):
        model.generate(**batch, **static)


# -- item 4: generate without a cache -----------------------------------------------------------------


def test_generate_without_a_cache_is_refused_and_forward_without_one_trims(model, batch):
    with crosstrim.trimmed(model, CONFIG) as handle:
        with pytest.raises(ValueError, match="use_cache=True"):
            model.generate(**batch, **GREEDY, use_cache=False)
        no_cache = transformers.GenerationConfig(**GREEDY, use_cache=False)
        with pytest.raises(ValueError, match="use_cache=True"):
            model.generate(**batch, generation_config=no_cache)
        assert handle.stats is None  # refused before anything ran
        without = forward(model, batch, use_cache=False).logits
        assert all(k < v for k, v in zip(handle.stats.kept_counts, handle.stats.valid_counts))
        assert torch.equal(without, forward(model, batch, use_cache=True).logits)
    assert "generate" not in model.__dict__  # remove() restored the class's generate


# -- item 5: threads -------------------------------------------------------------------------------


def test_two_threads_on_one_trimmed_model_each_trim_their_own_call(model, processor):
    batches = [inputs(processor, SAMPLES[:2]), inputs(processor, SAMPLES[2:], seed=5)]
    with crosstrim.trimmed(model, CONFIG) as handle:
        alone = []
        for b in batches:
            logits = forward(model, b).logits
            alone.append((logits, handle.stats))
        main_stats = handle.stats
        # Both threads wait for each other between the first cross-attention layer (selection) and
        # the later ones (gather), so each call's state is live while the other thread's call runs.
        meet = threading.Barrier(2, timeout=60)
        between = cross_layers(model)[0] + 1

        def wait(layer, args):
            meet.wait()  # returns None: the layer's inputs stay as they are

        hook = text_model(model).layers[between].register_forward_pre_hook(wait)
        results: dict[int, tuple] = {}

        def run(i):
            try:
                results[i] = (forward(model, batches[i]).logits, handle.stats)
            except BaseException as error:  # reported below, not lost in the thread
                results[i] = (error, None)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            hook.remove()
        for i, (logits, stats) in enumerate([results[0], results[1]]):
            assert isinstance(logits, torch.Tensor), logits
            expected_logits, expected_stats = alone[i]
            torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
            assert stats.kept_counts == expected_stats.kept_counts
            assert all(torch.equal(a, b) for a, b in zip(stats.kept_indices, expected_stats.kept_indices))
        assert handle.stats is main_stats  # the threads' calls did not replace this thread's stats


# -- item 6: exceptions ----------------------------------------------------------------------------


def test_an_exception_inside_the_decoder_releases_the_gathered_tensors(model, batch):
    seen = {}

    def fail(layer, args, kwargs):  # runs after crosstrim's pre-hook, so it sees the gathered tensors
        seen["states"] = weakref.ref(kwargs["cross_attention_states"])
        seen["mask"] = weakref.ref(kwargs["cross_attention_mask"])
        raise MemoryError("simulated out of memory")

    with crosstrim.trimmed(model, CONFIG):
        expected = forward(model, batch).logits
        hook = text_model(model).layers[cross_layers(model)[-1]].register_forward_pre_hook(fail, with_kwargs=True)
        try:
            with pytest.raises(MemoryError):
                forward(model, batch)
        finally:
            hook.remove()
        gc.collect()
        assert seen["states"]() is None and seen["mask"]() is None
        assert seen["states"] is not None
        assert torch.equal(forward(model, batch).logits, expected)  # the next call starts clean


# -- item 7: training mode -------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["train", "gradient-checkpointing"])
def test_training_mode_is_refused(fresh, batch, checkpointing):
    if checkpointing:
        fresh.gradient_checkpointing_enable()
    fresh.train()
    with crosstrim.trimmed(fresh, CONFIG), pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        fresh(**batch).logits.sum().backward()
    fresh.eval()
    with crosstrim.trimmed(fresh, CONFIG) as handle:
        forward(fresh, batch)
    assert handle.stats is not None


# -- item 8: padding slots at decode ------------------------------------------------------------------


def test_decode_masks_the_padding_slots_of_a_sample_that_keeps_few_tokens(model, processor):
    """Sample 1 (one tile) keeps 6 tokens, sample 0 (four tiles) 21: sample 1 has 15 padding slots,
    all gathered from token 0, which its last row may attend. Decode must keep them masked."""
    batch = inputs(processor, [([4], "<|image|> how many shapes are there ?"), ([1], "<|image|> it ?")])
    config = crosstrim.TrimConfig(keep_ratio=0.3)
    with crosstrim.trimmed(model, config) as handle:
        logits = decode(model, batch)
        stats = handle.stats
        tokens = model.generate(**batch, **GREEDY)
    assert stats.kept_counts == (21, 6)
    assert bool(batch["cross_attention_mask"][1, -1, 0, 0])  # its last row may attend slot 0's token
    with masked_reference(model, stats.kept_indices, stats.image_tokens):
        torch.testing.assert_close(logits, decode(model, batch), atol=1e-5, rtol=0)
        assert torch.equal(tokens, model.generate(**batch, **GREEDY))


# -- item 9: drift ---------------------------------------------------------------------------------


def test_drift_in_hook_points_or_arguments_is_refused_at_trim(fresh, monkeypatch):
    first = text_model(fresh).layers[cross_layers(fresh)[0]]
    with monkeypatch.context() as patch:
        patch.delattr(first.cross_attn, "q_norm")
        with pytest.raises(RuntimeError, match=rf"{DRIFT}.*cross_attn\.q_norm"):
            crosstrim.trim(fresh)
    with monkeypatch.context() as patch:
        patch.delattr(first.cross_attn, "scaling")
        with pytest.raises(RuntimeError, match=rf"{DRIFT}.*scaling"):
            crosstrim.trim(fresh)

    def renamed(self, hidden_states, image_states=None, cross_attention_mask=None, attention_mask=None,
                full_text_row_masked_out_mask=None, cache=None, **kwargs):  # fmt: skip
        raise AssertionError("never called")

    def no_cache(self, hidden_states, cross_attention_states=None, cross_attention_mask=None,
                 full_text_row_masked_out_mask=None, kv_store=None):  # fmt: skip
        raise AssertionError("never called")

    layer_class = modeling_mllama.MllamaCrossAttentionDecoderLayer
    for forward_fn, named in [(renamed, "cross_attention_states"), (no_cache, "neither `cache` nor")]:
        with monkeypatch.context() as patch:
            patch.setattr(layer_class, "forward", forward_fn)
            with pytest.raises(RuntimeError, match=rf"{DRIFT}.*{named}"):
                crosstrim.trim(fresh)
    assert crosstrim.TrimHandle.of(fresh) is None  # nothing was left half-trimmed
    crosstrim.trim(fresh).remove()


def _positional_states(layer, args, kwargs):
    """A transformers that passes the image features positionally: the layer still works, unseen by kwargs."""
    kwargs = dict(kwargs)
    states = kwargs.pop("cross_attention_states", None)
    if states is None:
        return None
    return (*args, states), kwargs


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_layer_that_does_not_get_the_features_by_keyword_fails_loudly(fresh, batch, where):
    layers = cross_layers(fresh)
    idx = layers[0] if where == "first" else layers[-1]
    with crosstrim.trimmed(fresh, CONFIG) as handle:
        hook = (
            text_model(fresh).layers[idx].register_forward_pre_hook(_positional_states, with_kwargs=True, prepend=True)
        )
        try:
            with pytest.raises(RuntimeError, match=DRIFT):
                forward(fresh, batch)
        finally:
            hook.remove()
        forward(fresh, batch)  # without the drift, it trims again
        assert all(k < v for k, v in zip(handle.stats.kept_counts, handle.stats.valid_counts))


def test_image_features_that_are_not_whole_image_slots_fail_loudly(model):
    """Budgets are per image slot; a row of image tokens that is not whole slots (a layout crosstrim does not
    know) is refused, never read as one image."""
    vision = model.config.vision_config
    slot = vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)
    with crosstrim.trimmed(model, CONFIG) as handle:
        assert handle._images(2 * slot) == 2
        with pytest.raises(RuntimeError, match=rf"{DRIFT}.*{slot + 1} image tokens per sample"):
            handle._images(slot + 1)


def test_a_cache_that_does_not_hold_the_kept_width_fails_loudly(fresh, batch):
    later = cross_layers(fresh)[-1]

    def doubled(layer, args, kwargs, output):  # as if transformers cached repeated or ungathered keys
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        stored = cache.layers[later]
        stored.keys = torch.cat([stored.keys, stored.keys], dim=-2)

    with crosstrim.trimmed(fresh, CONFIG):
        hook = text_model(fresh).layers[later].register_forward_hook(doubled, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match=rf"{DRIFT}.*layer {later} caches"):
                forward(fresh, batch, use_cache=True)
        finally:
            hook.remove()


def test_a_decode_step_on_a_cache_that_lost_the_selection_fails_loudly(model, batch):
    with crosstrim.trimmed(model, CONFIG):
        decode(model, batch, steps=1)  # the normal path
        original = modeling_mllama.MllamaForConditionalGeneration.forward

        def forgetful(self, *args, **kwargs):  # as if transformers copied the cache between steps
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and "_crosstrim_selection" in vars(cache):
                del cache._crosstrim_selection
            return original(self, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(modeling_mllama.MllamaForConditionalGeneration, "forward", forgetful)
            with pytest.raises(RuntimeError, match=rf"{DRIFT}.*carries no crosstrim selection"):
                decode(model, batch, steps=1)


def test_a_replaced_norm_module_fails_loudly_instead_of_crashing(fresh, batch):
    attn = text_model(fresh).layers[cross_layers(fresh)[0]].cross_attn
    with crosstrim.trimmed(fresh, CONFIG):
        original = attn.q_norm
        attn.q_norm = copy.deepcopy(original)  # a module crosstrim's capture hook is not on
        try:
            with pytest.raises(RuntimeError, match=rf"{DRIFT}.*q_norm"):
                forward(fresh, batch)
        finally:
            attn.q_norm = original


# -- item 12: what output_attentions returns ---------------------------------------------------------


def test_later_layers_attention_maps_are_as_wide_as_the_kept_slots(processor, batch):
    """README, "Known limits": with eager attention, later cross layers' maps cover the K kept slots."""
    eager = tiny.random_model(seed=0, processor=processor)[0]
    eager.set_attn_implementation("eager")
    layers = cross_layers(eager)
    with crosstrim.trimmed(eager, CONFIG) as handle:
        attentions = forward(eager, batch, output_attentions=True).attentions
    assert attentions[layers[0]].shape[-1] == handle.stats.image_tokens
    for idx in layers[1:]:
        assert attentions[idx].shape[-1] == max(handle.stats.kept_counts) < handle.stats.image_tokens
