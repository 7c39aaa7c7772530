"""`TrimConfig.from_options`: the one strict parser the CLI, `crosstrim eval` and the lmms-eval adapter share."""

import pytest

from crosstrim.core import TrimConfig

FLAGS = {"method": "--method", "k_ratio": "--k-ratio", "keep_ratio": "--keep-ratio", "seed": "--seed"}
FLAGS |= {"trim_first_layer_cache": "--trim-first-layer-cache", "summarize_dropped": "--summarize-dropped"}


def test_strings_and_typed_values_give_the_same_config():
    typed = {"method": "uniform", "keep_ratio": 0.5, "seed": 3, "summarize_dropped": True}
    strings = {"method": "uniform", "keep_ratio": "0.5", "seed": "3", "summarize_dropped": "yes"}
    expected = TrimConfig(method="uniform", keep_ratio=0.5, seed=3, summarize_dropped=True)
    assert TrimConfig.from_options(typed) == TrimConfig.from_options(strings) == expected
    assert isinstance(TrimConfig.from_options({"k_ratio": 1}).k_ratio, float)


def test_none_means_not_given():
    assert TrimConfig.from_options({"k_ratio": None, "keep_ratio": None, "seed": None}) == TrimConfig()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (True, True), ("true", True), ("True", True), ("1", True), ("yes", True), (1, True),
        (False, False), ("false", False), ("False", False), (" FALSE ", False), ("0", False), ("no", False), (0, False),
    ],
)  # fmt: skip
def test_booleans_parse_strictly(given, expected):
    assert TrimConfig.from_options({"summarize_dropped": given}).summarize_dropped is expected


@pytest.mark.parametrize("given", ["maybe", "", "off", 2, 0.5, [True]])
def test_anything_else_is_not_a_boolean(given):
    with pytest.raises(ValueError, match=r"summarize_dropped must be true or false \(or 1/0, yes/no\), got"):
        TrimConfig.from_options({"summarize_dropped": given})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k_ratio": "0.25x"}, "k_ratio must be a number, got '0.25x'"),
        ({"k_ratio": True}, "k_ratio must be a number, got True"),
        ({"k_ratio": "1.5"}, r"k_ratio must be in \(0, 1\], got 1.5"),
        ({"k_ratio": "nan"}, r"k_ratio must be in \(0, 1\], got nan"),
        ({"method": "random", "keep_ratio": 0.5, "seed": "1.5"}, r"seed must be a whole number, got '1\.5'"),
        ({"method": "random", "keep_ratio": 0.5, "seed": 2.0}, r"seed must be a whole number, got 2\.0"),
        ({"method": "fastv"}, "method: unknown method 'fastv'; choose one of trimmed, mean, random, uniform"),
    ],
)
def test_numbers_and_names_parse_strictly(options, message):
    with pytest.raises(ValueError, match=message):
        TrimConfig.from_options(options)


def test_an_unknown_option_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option 'k'; valid options: method, k_ratio, keep_ratio, seed, "):
        TrimConfig.from_options({"k": 0.2})
    with pytest.raises(ValueError, match=r"unknown option 'ratio'; valid options: --method, --k-ratio, "):
        TrimConfig.from_options({"ratio": 0.2}, names=FLAGS)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k_ratio": "2"}, "--k-ratio must be in (0, 1], got 2.0; e.g. --k-ratio=0.25"),
        ({"keep_ratio": "x"}, "--keep-ratio must be a number, got 'x'"),
        ({"method": "random"}, "--method='random' needs --keep-ratio, e.g. --keep-ratio=0.5"),
        ({"method": "mean", "k_ratio": 0.5}, "--k-ratio applies to --method='trimmed' only; use --keep-ratio with"),
        ({"k_ratio": 0.5, "keep_ratio": 0.5}, "give either --k-ratio (adaptive, per-head top-k) or --keep-ratio"),
        (
            {"summarize_dropped": True, "trim_first_layer_cache": "yes"},
            "--summarize-dropped adds a summary token to the later layers only",
        ),
        ({"seed": "x"}, "--seed must be a whole number, got 'x'"),
    ],
)
def test_errors_name_each_option_as_the_caller_spells_it(options, message):
    with pytest.raises(ValueError) as caught:
        TrimConfig.from_options(options, names=FLAGS)
    assert message in str(caught.value)
    assert "_ratio" not in str(caught.value) and "first_layer" not in str(caught.value)
