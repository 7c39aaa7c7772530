"""The vLLM plugin's config key and slot arithmetic (no vLLM needed: these run in every environment)."""

from types import SimpleNamespace

import pytest

from crosstrim import TrimConfig
from crosstrim.integrations.vllm import settings


def config(**options):
    return SimpleNamespace(crosstrim=options)


def test_no_key_and_keep_ratio_one_serve_the_plain_model():
    assert settings.trim_config(SimpleNamespace()) is None
    assert settings.trim_config(config(keep_ratio=1.0)) is None


def test_keep_ratio_trims_every_cross_layer_including_the_first():
    assert settings.trim_config(config(keep_ratio=0.25, method="random", seed=3)) == TrimConfig(
        method="random", keep_ratio=0.25, seed=3, trim_first_layer_cache=True
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k_ratio": 0.25}, "use keep_ratio"),
        ({"keep_ratio": 0.25, "trim_first_layer_cache": False}, "trim_first_layer_cache is always on"),
        ({"keep_ratio": 0.25, "summarize_dropped": True}, "does not take summarize_dropped"),
        ({"method": "uniform"}, "needs keep_ratio"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
    ],
)
def test_what_vllm_cannot_honour_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        settings.trim_config(config(**options))


def test_the_key_must_be_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        settings.trim_config(SimpleNamespace(crosstrim=0.25))


@pytest.mark.parametrize("ratio", [None, 0.5, 0.25, 0.1])
def test_slots_are_the_budget_of_the_valid_tokens_and_give_the_tile_count_back(ratio):
    trim = None if ratio is None else TrimConfig(keep_ratio=ratio, trim_first_layer_cache=True)
    per_tile = 1601  # the 560 px checkpoints
    settings.check_budget(per_tile, trim)
    for tiles in range(1, 5):
        slots = settings.image_slots(tiles, per_tile, trim)
        assert slots == (tiles * per_tile if ratio is None else -(-tiles * per_tile * round(ratio * 100) // 100))
        assert settings.valid_tiles(slots, 4, per_tile, trim) == tiles


def test_a_budget_below_one_token_per_tile_is_refused():
    with pytest.raises(ValueError, match=r"keep_ratio >= 0\.05882"):
        settings.check_budget(17, TrimConfig(keep_ratio=0.05, trim_first_layer_cache=True))
