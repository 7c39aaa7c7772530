"""The method on plain tensors, checked against independent brute-force oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosstrim import method
from crosstrim.config import TrimConfig


@st.composite
def scored(draw):
    """Random (scores (B,H,N), valid (B,N)) with distinct scores and >= 1 valid token per row."""
    b, h, n = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(b, h, n, generator=gen)
    valid = torch.rand(b, n, generator=gen) < draw(st.floats(0.2, 1.0))
    valid[:, draw(st.integers(0, n - 1))] = True
    return scores, valid


ratios = st.floats(0.01, 1.0)


def oracle_union(scores, valid, k_ratio):
    keep = torch.zeros_like(valid)
    for b in range(scores.shape[0]):
        idx = valid[b].nonzero().flatten()
        k = math.ceil(round(k_ratio * len(idx), 6))
        for h in range(scores.shape[1]):
            top = scores[b, h, idx].topk(k).indices
            keep[b, idx[top]] = True
    return keep


@settings(max_examples=60, deadline=None)
@given(scored(), ratios)
def test_union_topk_is_union_of_per_head_topk(data, k_ratio):
    scores, valid = data
    assert torch.equal(method.union_topk(scores, valid, k_ratio), oracle_union(scores, valid, k_ratio))


@settings(max_examples=60, deadline=None)
@given(scored(), ratios)
def test_union_budget_is_exact_and_grows_the_union(data, keep_ratio):
    scores, valid = data
    keep = method.union_budget(scores, valid, keep_ratio)
    counts = valid.sum(-1)
    assert torch.equal(keep.sum(-1), method.budget(counts, keep_ratio))
    assert not (keep & ~valid).any()
    # Every adaptive union that fits the budget is contained in the budgeted selection.
    for k in range(1, int(counts.max()) + 1):
        union = oracle_union(scores, valid, k / int(counts.max()))
        fits = union.sum(-1) <= keep.sum(-1)
        assert not (union[fits] & ~keep[fits]).any()


@settings(max_examples=60, deadline=None)
@given(scored(), ratios)
def test_mean_topk_takes_the_global_top_of_the_head_sum(data, keep_ratio):
    scores, valid = data
    keep = method.mean_topk(scores, valid, keep_ratio)
    total = scores.sum(1)
    for b in range(scores.shape[0]):
        idx = valid[b].nonzero().flatten()
        k = math.ceil(round(keep_ratio * len(idx), 6))
        expected = set(idx[total[b, idx].topk(k).indices].tolist())
        assert set(keep[b].nonzero().flatten().tolist()) == expected


@settings(max_examples=60, deadline=None)
@given(scored(), ratios, st.integers(0, 1000))
def test_random_keep_is_exact_seeded_valid_and_row_wise(data, keep_ratio, seed):
    _, valid = data
    seeds = [method.derive_seed(seed, [row]) for row in range(valid.shape[0])]
    first = method.random_keep(valid, keep_ratio, seeds)
    assert torch.equal(first, method.random_keep(valid, keep_ratio, seeds))
    assert torch.equal(first.sum(-1), method.budget(valid.sum(-1), keep_ratio))
    assert not (first & ~valid).any()
    # A row's draw is its own: alone, or among rows in another order, it keeps the same tokens.
    for row in range(valid.shape[0]):
        assert torch.equal(method.random_keep(valid[row : row + 1], keep_ratio, seeds[row : row + 1])[0], first[row])
    assert torch.equal(method.random_keep(valid.flip(0), keep_ratio, seeds[::-1]), first.flip(0))


def test_random_keep_depends_on_the_seed_and_needs_one_per_row():
    valid = torch.ones(2, 200, dtype=torch.bool)
    a = method.random_keep(valid, 0.3, [1, 1])
    b = method.random_keep(valid, 0.3, [2, 1])
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="one seed per row: 2 rows, 1 seeds"):
        method.random_keep(valid, 0.3, [1])
    with pytest.raises(ValueError, match="needs one seed per row"):
        method.select(TrimConfig(method="random", keep_ratio=0.3), None, valid)


def test_derive_seed_is_a_stable_function_of_every_integer_and_part_boundary():
    base = method.derive_seed(0, [5, 6, 7], [1, 0])
    assert (
        base
        == method.derive_seed(0, (5, 6, 7), torch.tensor([1, 0]).tolist())
        == method.derive_seed(0, [5, 6, 7], [True, False])
    )
    assert 0 <= base < 2**63
    others = [
        method.derive_seed(1, [5, 6, 7], [1, 0]),
        method.derive_seed(0, [5, 6, 8], [1, 0]),
        method.derive_seed(0, [5, 6, 7], [1, 1]),
        method.derive_seed(0, [5, 6], [7, 1, 0]),
        method.derive_seed(0, [5, 6, 7, 1, 0]),
        method.derive_seed(-1, [5, 6, 7], [1, 0]),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert method.derive_seed(0, [5, 6, 7], [1, 0]) == base  # no hidden state
    # Pinned: published random-baseline numbers depend on this derivation; change it only on purpose.
    seed = method.derive_seed(0, [1, 2, 3], [1, 0])
    assert seed == 7303885053439347170
    assert method.random_keep(torch.ones(1, 10, dtype=torch.bool), 0.3, [seed]).nonzero()[:, 1].tolist() == [3, 7, 8]


@settings(max_examples=60, deadline=None)
@given(scored(), ratios)
def test_uniform_keep_is_exact_and_evenly_strided(data, keep_ratio):
    _, valid = data
    keep = method.uniform_keep(valid, keep_ratio)
    assert torch.equal(keep.sum(-1), method.budget(valid.sum(-1), keep_ratio))
    assert not (keep & ~valid).any()
    for b in range(valid.shape[0]):
        rank = torch.cumsum(valid[b].long(), 0) - 1
        picked = rank[keep[b]]
        assert picked[0] == 0
        gaps = picked.diff()
        if len(gaps):
            assert int(gaps.max() - gaps.min()) <= 1


def test_budget_is_robust_to_float_noise():
    assert method.budget(torch.tensor([30, 10, 7, 0]), 0.1).tolist() == [3, 1, 1, 0]
    assert method.budget(torch.tensor([6404]), 0.25).tolist() == [1601]


@settings(max_examples=60, deadline=None)
@given(scored())
def test_keep_to_index_round_trips_in_spatial_order(data):
    _, keep = data
    index, slot_valid = method.keep_to_index(keep)
    assert index.shape[1] == int(keep.sum(-1).max())
    rebuilt = torch.zeros_like(keep)
    for b in range(keep.shape[0]):
        kept = index[b][slot_valid[b]]
        assert torch.equal(kept, kept.sort().values)
        rebuilt[b, kept] = True
    assert torch.equal(rebuilt, keep)


def test_gather_mask_masks_padding_slots_and_keeps_uniform_rows():
    minimum = torch.finfo(torch.float32).min
    mask = torch.tensor([[[[0.0, minimum, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], [[[0.0, 0.0, minimum, 0.0], [0.0] * 4]]])
    keep = torch.tensor([[True, True, False, True], [False, True, False, False]])
    index, slot_valid = method.keep_to_index(keep)
    out = method.gather_mask(mask, index, slot_valid)
    assert out.shape == (2, 1, 2, 3)
    assert out[0, 0, 0].tolist() == [0.0, minimum, 0.0]
    assert out[0, 0, 1].tolist() == [0.0, 0.0, 0.0]  # a fully-masked row stays uniform over kept tokens
    assert out[1, 0, 1].tolist() == [0.0, minimum, minimum]  # ... and never reaches padding slots
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert torch.equal(method.gather_tokens(states, index)[0], states[0, [0, 1, 3]])


def eager_scores(query, key, mask, rows, scaling):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    weights = torch.softmax(query @ key.transpose(-1, -2) * scaling + mask, dim=-1)
    return (weights * rows[:, None, :, None]).sum(2)


@pytest.mark.parametrize("max_elements", [1, 50, 1 << 25])
def test_attention_scores_equal_summed_softmax_weights(max_elements):
    gen = torch.Generator().manual_seed(0)
    b, h, g, length, n, d = 2, 4, 2, 7, 11, 8
    query, key = torch.randn(b, h, length, d, generator=gen), torch.randn(b, g, n, d, generator=gen)
    mask = torch.where(torch.rand(b, 1, length, n, generator=gen) < 0.3, torch.finfo(torch.float32).min, 0.0)
    rows = torch.rand(b, length, generator=gen) < 0.6
    got = method.attention_scores(query, key, mask, rows, d**-0.5, max_elements)
    torch.testing.assert_close(got, eager_scores(query, key, mask, rows, d**-0.5), atol=1e-5, rtol=1e-5)


def test_scoring_rows_and_valid_tokens_ignore_masked_rows():
    minimum = torch.finfo(torch.float32).min
    # Row 0: before the image (transformers zeroes it: "attend everything"); row 1: real; row 2: padding.
    mask = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 0.0, minimum], [0.0, 0.0, 0.0]]]])
    full_row = torch.tensor([[[[0.0], [1.0], [1.0]]]])
    attention_mask = torch.tensor([[1, 1, 0]])
    rows = method.scoring_rows(full_row, attention_mask, 1, 3, torch.device("cpu"))
    assert rows.tolist() == [[False, True, False]]
    assert method.valid_tokens(mask, rows).tolist() == [[True, True, False]]


def test_select_dispatches_every_method():
    scores, valid = torch.rand(1, 2, 20), torch.ones(1, 20, dtype=torch.bool)
    for config in [
        TrimConfig(k_ratio=0.2),
        TrimConfig(keep_ratio=0.2),
        TrimConfig(method="mean", keep_ratio=0.2),
        TrimConfig(method="random", keep_ratio=0.2),
        TrimConfig(method="uniform", keep_ratio=0.2),
    ]:
        keep = method.select(config, scores, valid, seeds=[0])
        assert 4 <= int(keep.sum()) <= 8, config
    assert method.select(TrimConfig(keep_ratio=1.0), None, valid).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_summary_token_attends_like_every_dropped_token_replaced_by_their_mean(batch, images, per_image, seed):
    """ToMe's identity: n equal keys attract what one key with logit + log(n) attracts."""
    gen = torch.Generator().manual_seed(seed)
    tokens, dim, length, minimum = images * per_image, 6, 4, torch.finfo(torch.float32).min
    states = torch.randn(batch, tokens, dim, generator=gen)
    valid = torch.rand(batch, tokens, generator=gen) < 0.8
    keep = valid & (torch.rand(batch, tokens, generator=gen) < 0.5)
    valid[:, ::per_image] = True  # every image has a real tile: no row is left fully masked
    keep[:, 0] = True
    dropped = valid & ~keep
    mask = torch.where(valid[:, None, None, :].expand(batch, 1, length, tokens), 0.0, minimum).clone()
    if images > 1:
        mask[:, :, 1, :per_image] = minimum  # row 1 may not see image 0 (so not its stand-in either)
    query = torch.randn(batch, length, dim, generator=gen)

    # Reference: every dropped token replaced by its image's dropped mean, nothing removed.
    replaced = states.clone()
    means = method.summary_tokens(states, dropped, images)
    for b in range(batch):
        for i in range(images):
            span = slice(i * per_image, (i + 1) * per_image)
            replaced[b, span][dropped[b, span]] = means[b, i]
            if dropped[b, span].any():
                torch.testing.assert_close(means[b, i], states[b, span][dropped[b, span]].mean(0))
    unmasked = mask.masked_fill(~(keep | valid)[:, None, None, :], minimum)[:, 0]
    reference = torch.softmax(query @ replaced.transpose(1, 2) + unmasked, -1) @ replaced

    index, slot_valid = method.keep_to_index(keep)
    kept = torch.cat([method.gather_tokens(states, index), means], 1)
    kept_mask = torch.cat([method.gather_mask(mask, index, slot_valid), method.summary_mask(mask, dropped, images)], -1)
    got = torch.softmax(query @ kept.transpose(1, 2) + kept_mask[:, 0], -1) @ kept
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_summary_mask_masks_images_that_dropped_nothing_and_rows_that_cannot_see_them():
    minimum = torch.finfo(torch.float32).min
    mask = torch.zeros(1, 1, 2, 6)
    mask[0, 0, 1, 3:] = minimum  # row 1 cannot see image 1
    dropped = torch.tensor([[False, False, False, True, True, False]])
    columns = method.summary_mask(mask, dropped, images=2)
    assert columns[0, 0, :, 0].tolist() == [minimum, minimum]  # image 0 dropped nothing
    assert columns[0, 0, 0, 1].item() == pytest.approx(math.log(2)) and columns[0, 0, 1, 1].item() == minimum
