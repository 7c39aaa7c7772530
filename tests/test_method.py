"""The method on plain tensors, checked against independent brute-force oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosstrim import core as method
from crosstrim.core import TrimConfig


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
def test_selection_from_keep_round_trips_in_spatial_order(data):
    _, keep = data
    selection = method.Selection.from_keep(keep)
    index, slot_valid = selection.index, selection.slot_valid
    assert index.shape[1] == int(keep.sum(-1).max())
    rebuilt = torch.zeros_like(keep)
    for b in range(keep.shape[0]):
        kept = index[b][slot_valid[b]]
        assert torch.equal(kept, kept.sort().values)
        rebuilt[b, kept] = True
    assert torch.equal(rebuilt, keep)


def test_selection_mask_masks_padding_slots_and_keeps_uniform_rows():
    minimum = torch.finfo(torch.float32).min
    mask = torch.tensor([[[[0.0, minimum, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], [[[0.0, 0.0, minimum, 0.0], [0.0] * 4]]])
    keep = torch.tensor([[True, True, False, True], [False, True, False, False]])
    selection = method.Selection.from_keep(keep)
    out = selection.mask(mask)
    assert out.shape == (2, 1, 2, 3)
    assert out[0, 0, 0].tolist() == [0.0, minimum, 0.0]
    assert out[0, 0, 1].tolist() == [0.0, 0.0, 0.0]  # a fully-masked row stays uniform over kept tokens
    assert out[1, 0, 1].tolist() == [0.0, minimum, minimum]  # ... and never reaches padding slots
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert torch.equal(selection.features(states)[0], states[0, [0, 1, 3]])


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
    selection = method.Selection.from_keep(keep, images, dropped)
    means = selection.features(states)[:, selection.kept_slots :]
    for b in range(batch):
        for i in range(images):
            span = slice(i * per_image, (i + 1) * per_image)
            replaced[b, span][dropped[b, span]] = means[b, i]
            if dropped[b, span].any():
                torch.testing.assert_close(means[b, i], states[b, span][dropped[b, span]].mean(0))
    unmasked = mask.masked_fill(~(keep | valid)[:, None, None, :], minimum)[:, 0]
    reference = torch.softmax(query @ replaced.transpose(1, 2) + unmasked, -1) @ replaced

    kept = selection.features(states)
    kept_mask = selection.mask(mask)
    got = torch.softmax(query @ kept.transpose(1, 2) + kept_mask[:, 0], -1) @ kept
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_summary_mask_masks_images_that_dropped_nothing_and_rows_that_cannot_see_them():
    minimum = torch.finfo(torch.float32).min
    mask = torch.zeros(1, 1, 2, 6)
    mask[0, 0, 1, 3:] = minimum  # row 1 cannot see image 1
    dropped = torch.tensor([[False, False, False, True, True, False]])
    columns = method.Selection.from_keep(~dropped, images=2, dropped=dropped).mask(mask)[..., -2:]
    assert columns[0, 0, :, 0].tolist() == [minimum, minimum]  # image 0 dropped nothing
    assert columns[0, 0, 0, 1].item() == pytest.approx(math.log(2)) and columns[0, 0, 1, 1].item() == minimum


@st.composite
def selections(draw, batch=None):
    """A keep mask (B, N) over ``images`` image slots, the dropped mask (or None) and features (B, N, D)."""
    b = draw(st.integers(1, 3)) if batch is None else batch
    images, per_image = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tokens = images * per_image
    valid = torch.rand(b, tokens, generator=gen) < draw(st.floats(0.0, 1.0))
    keep = valid & (torch.rand(b, tokens, generator=gen) < draw(st.floats(0.0, 1.0)))
    dropped = valid & ~keep if draw(st.booleans()) else None
    return keep, images, dropped, gen


def brute_force(keep, images, dropped, states, mask, cache):
    """Features, mask and cache over the kept slots, one row and slot at a time."""
    batch, tokens = keep.shape
    minimum = torch.finfo(mask.dtype).min
    width = max(1, int(keep.sum(-1).max()))
    summaries = images if dropped is not None else 0
    per_image = tokens // images
    features = torch.zeros(batch, width + summaries, states.shape[-1])
    columns = torch.full((batch, 1, mask.shape[2], width + summaries), minimum)
    cached = torch.zeros(batch, cache.shape[1], width, cache.shape[-1])
    for b in range(batch):
        for slot, token in enumerate(i for i in range(tokens) if keep[b, i]):
            features[b, slot] = states[b, token]
            columns[b, 0, :, slot] = mask[b, 0, :, token]
            cached[b, :, slot] = cache[b, :, token]
        for image in range(summaries):
            span = [i for i in range(image * per_image, (image + 1) * per_image) if dropped[b, i]]
            if span:
                features[b, width + image] = states[b, span].mean(0)
            for row in range(mask.shape[2]):
                sees = any(mask[b, 0, row, i] == 0 for i in range(image * per_image, (image + 1) * per_image))
                if span and sees:
                    columns[b, 0, row, width + image] = math.log(len(span))
    return features, columns, cached


@settings(max_examples=80, deadline=None)
@given(selections())
def test_selection_gathers_features_masks_and_caches_alike_and_as_a_loop_does(drawn):
    keep, images, dropped, gen = drawn
    batch, tokens = keep.shape
    minimum = torch.finfo(torch.float32).min
    states = torch.randn(batch, tokens, 5, generator=gen)
    mask = torch.where(torch.rand(batch, 1, 3, tokens, generator=gen) < 0.3, minimum, 0.0)
    cache = torch.randn(batch, tokens, 2, 4, generator=gen).transpose(1, 2)  # strided, as Mllama caches it
    selection = method.Selection.from_keep(keep, images, dropped)
    features, columns, cached = brute_force(keep, images, dropped, states, mask, cache)
    assert selection.width == features.shape[1] == selection.kept_slots + (images if dropped is not None else 0)
    torch.testing.assert_close(selection.features(states), features, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(selection.mask(mask), columns)
    # The three layouts agree: a features tensor is a cache with one group, contiguous or not.
    kept = method.Selection.from_keep(keep, images)
    assert torch.equal(kept.cache(cache), cached)
    assert torch.equal(kept.cache(cache.contiguous()), cached)
    assert torch.equal(kept.cache(states[:, None]), kept.features(states)[:, None])
    assert torch.equal(kept.features(states.transpose(0, 1).contiguous().transpose(0, 1)), kept.features(states))


@settings(max_examples=80, deadline=None)
@given(st.lists(selections(), min_size=1, max_size=3), st.integers(1, 3))
def test_selections_concatenate_as_their_keep_masks_do_and_repeat_for_beams(parts, repeats):
    images, summarize = parts[0][1], parts[0][2] is not None
    tokens = parts[0][0].shape[1]
    gen = parts[0][3]
    keeps, droppeds = [], []
    for keep, _, _, _ in parts:  # every part over the first one's image layout and summary setting
        keep = torch.nn.functional.pad(keep, (0, max(0, tokens - keep.shape[1])))[:, :tokens]
        keeps.append(keep)
        droppeds.append(~keep & (torch.rand(keep.shape, generator=gen) < 0.5) if summarize else None)
    selections = [method.Selection.from_keep(k, images, d) for k, d in zip(keeps, droppeds)]
    merged = method.Selection.concatenate(selections)
    whole = method.Selection.from_keep(torch.cat(keeps), images, torch.cat(droppeds) if summarize else None)
    assert torch.equal(merged.index, whole.index) and torch.equal(merged.slot_valid, whole.slot_valid)
    assert (merged.dropped is None) == (not summarize)
    if summarize:
        assert torch.equal(merged.dropped, whole.dropped)
    # What every part gathered, widened to the merged width, is what the merged selection gathers.
    states = [torch.randn(k.shape[0], tokens, 3, generator=gen) for k in keeps]
    widened = [s.widen(s.features(x), merged.kept_slots, dim=1) for s, x in zip(selections, states)]
    assert torch.equal(torch.cat(widened), merged.features(torch.cat(states)))
    caches = [x.view(x.shape[0], 1, tokens, 3) for x in states]
    plain = [method.Selection.from_keep(k, images) for k in keeps]
    widened = [s.widen(s.cache(c), merged.kept_slots, dim=2) for s, c in zip(plain, caches)]
    assert torch.equal(torch.cat(widened), method.Selection.concatenate(plain).cache(torch.cat(caches)))
    # Beams: every row repeated in place is the selection of the repeated keep masks.
    beams = merged.repeat_interleave(repeats)
    again = method.Selection.from_keep(
        torch.cat(keeps).repeat_interleave(repeats, 0),
        images,
        torch.cat(droppeds).repeat_interleave(repeats, 0) if summarize else None,
    )
    assert torch.equal(beams.index, again.index) and torch.equal(beams.slot_valid, again.slot_valid)
    if summarize:
        assert torch.equal(beams.dropped, again.dropped)


def test_selection_refuses_tensors_and_partners_it_does_not_fit():
    keep = torch.tensor([[True, False, True, False]])
    selection = method.Selection.from_keep(keep, images=2)
    assert selection.kept_slots == 2 and method.Selection.from_keep(torch.zeros(2, 4, dtype=torch.bool)).kept_slots == 1
    with pytest.raises(ValueError, match=r"features \(B, N, D\) tensor with B=1, N=4; got \(1, 5, 3\)"):
        selection.features(torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match=r"additive mask \(B, 1, L, N\) tensor with B=1, N=4; got \(2, 1, 3, 4\)"):
        selection.mask(torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="cache tensor"):
        selection.cache(torch.zeros(1, 4, 3))
    summarized = method.Selection.from_keep(keep, images=2, dropped=~keep)
    with pytest.raises(ValueError, match="summary slots come from features, not from a cache"):
        summarized.cache(torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="same image tokens, image slots and summary setting"):
        method.Selection.concatenate([selection, summarized])
    with pytest.raises(ValueError, match="expected 2 slots along dim 1"):
        selection.widen(torch.zeros(1, 3, 5), 4, dim=1)
    with pytest.raises(ValueError, match="cannot narrow 2 kept slots to 1"):
        selection.widen(torch.zeros(1, 2, 5), 1, dim=1)
    with pytest.raises(ValueError, match="keep must be a"):
        method.Selection.from_keep(torch.ones(4))
    with pytest.raises(ValueError, match="do not split into 3 image slots"):
        method.Selection.from_keep(keep, images=3)
    with pytest.raises(ValueError, match=r"dropped must be \(B, N\) = \(1, 4\)"):
        method.Selection.from_keep(keep, dropped=torch.ones(1, 3, dtype=torch.bool))
