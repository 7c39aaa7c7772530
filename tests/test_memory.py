"""The analytic KV memory model: the bytes a real cache holds, the paper's numbers, `crosstrim kv`."""

import json
import math
from fractions import Fraction

import pytest
import torch
from support import inputs, positions, run_cli, text_model

import crosstrim
from crosstrim.engine import memory

# (tile counts of each image, text) per sample: one to three samples, 1-4 tiles, one or two images.
SHAPES = [
    [([4], "<|image|> how many shapes are there ?")],
    [([2, 1], "<|image|> what is the color <|image|> of the circle ?"), ([4], "<|image|> how many ?")],
    [([1], "<|image|> it ?"), ([3], "<|image|> what is in the image ?"), ([2], "describe it <|image|> a red")],
]


def forward_cache(model, batch):
    with torch.no_grad():
        return model(**batch, position_ids=positions(batch["attention_mask"]), use_cache=True).past_key_values


def held(model, cache):
    """(self-attention, cross-attention) bytes the cache holds."""
    kv = memory.held_kv_bytes(cache, text_model(model).config.cross_attention_layers)
    return kv.self_attn, kv.cross_attn


@pytest.mark.parametrize("shape", SHAPES, ids=["1x4tiles", "2-images+4tiles", "3-samples-1-3-2tiles"])
@pytest.mark.parametrize("r", [1.0, 0.5, 0.3, 0.1])
@pytest.mark.parametrize("first", [False, True], ids=["later", "all-layers"])
def test_analytic_bytes_equal_the_cache_after_a_real_prefill(model, processor, shape, r, first):
    mm = memory.MemoryModel.from_config(model.config)
    batch = inputs(processor, shape)
    length = batch["input_ids"].shape[1]  # padded text length: every row caches it
    slots = batch["pixel_values"].shape[1]  # image slots in the batch (padding image slots included)
    config = crosstrim.TrimConfig(keep_ratio=r, trim_first_layer_cache=first)
    with crosstrim.trimmed(model, config) as handle:
        cache = forward_cache(model, batch)
    self_bytes, cross_bytes = held(model, cache)
    assert self_bytes == mm.self_kv_bytes(length, torch.float32, batch=len(shape))
    # Every image keeps ceil(r * its valid tokens); the batch pads to its largest sample.
    kept = None
    if r < 1.0:
        kept = max(sum(memory.kept_tokens(t * mm.tokens_per_tile, r) for t in tiles) for tiles, _ in shape)
        assert kept == max(handle.stats.kept_counts)
    expected = mm.cross_kv_bytes_held(
        torch.float32,
        batch=len(shape),
        full_tokens=slots * mm.image_tokens,
        kept_width=kept,
        trim_first_layer_cache=first,
    )
    assert cross_bytes == expected == handle.stats.kv_bytes_kept
    if len(shape) == 1:  # the same through the one-image convenience API
        tiles = shape[0][0][0]
        assert cross_bytes == mm.cross_kv_bytes(torch.float32, r=r, tiles=tiles, trim_first_layer_cache=first)


def test_untrimmed_cache_and_trimmed_layers_are_exactly_kept_over_total(model, processor):
    mm = memory.MemoryModel.from_config(model.config)
    batch = inputs(processor, SHAPES[0])
    _, full = held(model, forward_cache(model, batch))
    assert full == mm.cross_kv_bytes(torch.float32)  # 3 cross layers x 4 tiles x 17 tokens
    with crosstrim.trimmed(model, crosstrim.TrimConfig(k_ratio=0.1, trim_first_layer_cache=True)) as handle:
        _, trimmed = held(model, forward_cache(model, batch))
    kept, total = handle.stats.kept_counts[0], mm.image_tokens
    assert 0 < kept < total
    assert Fraction(trimmed) == Fraction(kept, total) * full  # exactly, not approximately


def test_decode_weight_params_are_the_parameters_a_decode_step_reads(model):
    mm = memory.MemoryModel.from_config(model.config)
    cross = text_model(model).config.cross_attention_layers
    unread = ("embed_tokens", *(f"layers.{i}.cross_attn.{p}_proj" for i in cross for p in "kv"))
    read = sum(
        p.numel() for name, p in text_model(model).named_parameters() if not any(u in name for u in unread)
    ) + sum(p.numel() for p in model.lm_head.parameters())
    assert mm.decode_weight_params() == read


def test_presets_give_the_papers_numbers():
    m11, m90 = memory.preset("11b"), memory.preset("90b")
    assert (m11.layers, m11.n_cross, m11.cross_layers[:3], m11.cross_layers[-1]) == (40, 8, (3, 8, 13), 38)
    assert (m90.layers, m90.n_cross, m90.cross_layers[-1], m90.hidden, m90.heads) == (100, 20, 98, 8192, 64)
    assert m11.tokens_per_tile == (560 // 14) ** 2 + 1 and m11.image_tokens == 4 * m11.tokens_per_tile
    # 11B: 8 layers x 6404 tokens x 8 KV heads x 128 x (K + V) x 2 bytes = 209.8 MB per 4-tile image in bf16.
    assert m11.cross_kv_bytes("bf16") == 209_846_272
    assert m11.self_kv_bytes(1, "bf16") == 131_072  # 32 self layers x 8 x 128 x 2 x 2 B per text token
    assert m11.crossover_tokens("bf16") == pytest.approx(1601)  # cross KV dominates up to ~1600 text tokens
    assert m11.cross_kv_bytes("fp32") == 2 * m11.cross_kv_bytes("bf16")
    assert m90.cross_kv_bytes("bf16") == 524_615_680
    assert m90.crossover_tokens("bf16") == pytest.approx(1601)
    # Trimming moves the crossover: r=0.25 keeps 1601 tokens in the 7 later layers of 11B.
    assert m11.cross_kv_bytes("bf16", r=0.25) == (6404 + 7 * 1601) * 4096
    assert m11.crossover_tokens("bf16", r=0.25) == pytest.approx((6404 + 7 * 1601) / 32)


def test_token_counts_come_from_the_config_not_constants():
    config = memory.preset_config("11b")
    config.vision_config.image_size = 448  # transformers' default config: 32 x 32 patches + CLS
    config.vision_config.max_num_tiles = 2
    mm = memory.MemoryModel.from_config(config)
    assert (mm.tokens_per_tile, mm.image_tokens) == (1025, 2050)
    as_dict = memory.MemoryModel.from_config(config.to_dict())
    assert as_dict == mm


def test_decode_ratio_is_the_bytes_moved_formula():
    mm = memory.preset("11b")
    w, s, c = mm.decode_weight_bytes("bf16"), mm.self_kv_bytes(300, "bf16"), mm.cross_kv_bytes("bf16")
    for batch in (1, 16, 64):
        got = mm.decode_ratio("bf16", batch=batch, text_tokens=300, r=0.25, trim_first_layer_cache=True)
        assert got == pytest.approx((w + batch * (s + 0.25 * c)) / (w + batch * (s + c)), rel=1e-12)
    ratios = [mm.decode_ratio("bf16", batch=b, text_tokens=128, r=0.25) for b in (1, 8, 64)]
    assert ratios[0] > ratios[1] > ratios[2]  # the saving grows with batch


def test_largest_batch_fits_the_budget():
    mm = memory.preset("11b")
    fixed, budget = 20e9, 40e9
    for r in (1.0, 0.25):
        b = mm.largest_batch(budget, "bf16", text_tokens=512, fixed_bytes=fixed, r=r)
        per = mm.kv_bytes("bf16", text_tokens=512, r=r).total
        assert fixed + b * per <= budget < fixed + (b + 1) * per
    assert mm.largest_batch(10e9, "bf16", text_tokens=512, fixed_bytes=fixed) == 0


def test_element_size_and_kept_tokens_validate():
    assert memory.element_size(torch.bfloat16) == memory.element_size("bf16") == 2
    assert memory.kept_tokens(6404, 0.25) == 1601 and memory.kept_tokens(30, 0.1) == 3
    assert memory.kept_tokens(7, 0.5) == math.ceil(3.5)
    with pytest.raises(ValueError, match="unknown dtype"):
        memory.element_size("int3")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        memory.kept_tokens(10, 0.0)
    with pytest.raises(ValueError, match="unknown preset"):
        memory.preset("7b")


# -- `crosstrim kv` ----------------------------------------------------------------------------------------


def test_kv_prints_tables_and_writes_plot_and_json(capsys, tmp_path):
    code, out, err = run_cli(capsys, "kv", "--preset", "11b", "--keep", "0.25", "--batch", "1,16", "--out", tmp_path)
    assert code == 0, err
    assert "cross-attention KV per image:     209,846,272 B (209.8 MB)" in out
    assert "1,601 text tokens (full)" in out and "550 text tokens (r=0.25)" in out
    assert "(a) KV cache vs batch size" in out and "(b) KV cache vs text length" in out
    png = tmp_path / "kv-11b-bf16.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "kv-11b-bf16.json").read_text())
    assert data["vs_batch"][1]["cross_full"] == 16 * 209_846_272
    assert data["crossover_text_tokens"]["full"] == pytest.approx(1601)


def test_kv_reads_a_checkpoint_config_only(capsys, tmp_path, model):
    model.config.save_pretrained(tmp_path)  # config.json alone: no weights needed
    code, out, err = run_cli(capsys, "kv", "--model", tmp_path, "--dtype", "fp32", "--no-plot")
    assert code == 0, err
    assert "4 tiles x 17 tokens" in out and "3 cross-attention (1, 3, 5)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "7b"], "unknown preset '7b'"),
        (["--keep", "1.5"], "fractions in (0, 1]"),
        (["--batch", "0,2"], "--batch must be positive"),
        (["--lengths", "a"], "--lengths must be comma-separated integers"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
        (["--model", "{missing}"], "has no config.json"),
        (["--model", "{not_mllama}"], "'llama' model"),
    ],
)
def test_kv_bad_input_is_one_clear_line_and_exit_2(capsys, tmp_path, argv, message):
    (tmp_path / "not_mllama").mkdir()
    (tmp_path / "not_mllama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    places = {"missing": tmp_path / "nope", "not_mllama": tmp_path / "not_mllama"}
    argv = [a.format(**places) for a in argv]
    code, _, err = run_cli(capsys, "kv", "--no-plot", *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
