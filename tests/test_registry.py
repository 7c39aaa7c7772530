"""The method registry: a method defined and registered in this file alone runs end to end (trim, generate,
TrimConfig validation, the CLI's --method choices), with nothing else in crosstrim changed."""

import pytest
import torch
from support import inputs

import crosstrim
from crosstrim import core
from crosstrim.cli import options


class LastTokens(core.SelectionMethod):
    """Keeps the last ``budget`` valid tokens of every row: reads no scores and no seeds, fixed count."""

    name = "last-tokens"

    def select(self, scores, valid, ratio, seeds, *, adaptive):
        count = core.budget(valid.sum(-1), ratio)
        from_end = valid.flip(-1).cumsum(-1).flip(-1)  # valid tokens at or after each position
        return valid & (from_end <= count[:, None])


class ScoreAdaptive(core.SelectionMethod):
    """Adaptive (takes k_ratio) and reads scores: the tokens of the top half of any head's ranking, at k."""

    name = "score-adaptive"
    needs_scores = True
    adaptive = True
    default_k_ratio = 0.5

    def select(self, scores, valid, ratio, seeds, *, adaptive):
        assert scores is not None and scores.dim() == 3
        return core.union_topk(scores, valid, ratio) if adaptive else core.mean_topk(scores, valid, ratio)


@pytest.fixture
def registered():
    for method in (LastTokens, ScoreAdaptive):
        core.register_method(method)
    yield
    for method in (LastTokens, ScoreAdaptive):
        core.unregister_method(method.name)


def test_trimconfig_validation_follows_the_registry(registered):
    assert {"last-tokens", "score-adaptive"} <= set(core.method_names())
    assert crosstrim.TrimConfig(method="score-adaptive").k_ratio == 0.5  # its default budget
    assert not crosstrim.TrimConfig(method="last-tokens", keep_ratio=0.5).needs_scores
    assert crosstrim.TrimConfig(method="score-adaptive", keep_ratio=0.5).needs_scores
    with pytest.raises(ValueError, match="method='last-tokens' needs keep_ratio"):
        crosstrim.TrimConfig(method="last-tokens")
    with pytest.raises(ValueError, match="k_ratio applies to method='trimmed', 'score-adaptive' only"):
        crosstrim.TrimConfig(method="last-tokens", k_ratio=0.5)
    parsed = crosstrim.TrimConfig.from_options({"method": "last-tokens", "keep_ratio": "0.25"})
    assert parsed.method == "last-tokens"
    with pytest.raises(ValueError, match="a selection method named 'trimmed' is already registered"):
        core.register_method(type("Other", (core.SelectionMethod,), {"name": "trimmed"}))


def test_the_cli_offers_registered_methods(registered):
    import argparse

    parser = argparse.ArgumentParser()
    options.add_trim_arguments(parser)
    args = parser.parse_args(["--method", "last-tokens", "--keep-ratio", "0.5"])
    assert options.trim_config(args) == crosstrim.TrimConfig(method="last-tokens", keep_ratio=0.5)


def test_an_unregistered_method_is_unknown():
    with pytest.raises(ValueError, match="unknown method 'last-tokens'; choose one of trimmed, mean, random, uniform"):
        crosstrim.TrimConfig(method="last-tokens", keep_ratio=0.5)


@pytest.mark.parametrize(
    "config",
    [{"method": "last-tokens", "keep_ratio": 0.3}, {"method": "score-adaptive", "k_ratio": 0.1}],
    ids=lambda c: c["method"],
)
def test_a_registered_method_trims_and_generates_end_to_end(registered, model, processor, config):
    config = crosstrim.TrimConfig(**config)
    batch = inputs(processor, [([2], "<|image|> what is the color of the circle ?"), ([1], "<|image|> describe it")])
    greedy = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with crosstrim.trimmed(model, config) as handle:
        handle.record_scores = True
        one_shot = model.generate(**batch, **greedy)
        stats, scores = handle.stats, handle.scores
        micro = crosstrim.generate(model, prefill_batch_size=1, **batch, **greedy)
        assert torch.equal(micro, one_shot)
    valid = scores.valid
    expected = core.get_method(config.method).keep(
        scores.scores, valid, config.ratio, adaptive=config.k_ratio is not None
    )
    kept = tuple(torch.nonzero(row).flatten() for row in expected)
    assert all(torch.equal(a, b) for a, b in zip(stats.kept_indices, kept))
    assert all(k < v for k, v in zip(stats.kept_counts, stats.valid_counts))
    assert stats.method == config.describe()
