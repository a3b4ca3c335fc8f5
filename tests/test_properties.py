"""Properties of ``attention`` on the float64 reference backend (docs/design.rst sections 2, 4, 5).

Every test draws fresh random problems (odd lengths, so partial tiles are the rule) and
compares the library with the independent oracle of ``attention_ref.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pysparse_attn as psa
from attention_ref import (
    attention_ref,
    expand_kv,
    n_tiles,
)
from strategies import (
    ORDERS,
    TOLERANCES,
    make_rule,
    poisoned_allocations,
    problems,
    random_tile_mask,
    skip_rules_params,
)

RTOL, ATOL = TOLERANCES["float64"]


def run(problem, q=None, k=None, v=None, **options):
    """``psa.attention`` on the reference backend with the problem's block and scale."""
    q = problem.q if q is None else q
    k = problem.k if k is None else k
    v = problem.v if v is None else v
    return psa.attention(q, k, v, block=problem.block, scale=problem.scale,
                         backend="reference", return_stats=True, **options)


# ---------------------------------------------------------------------------------------------
# Dense


@given(problems(), st.sampled_from(ORDERS))
def test_dense_equals_softmax_qk_v(problem, order):
    out, stats = run(problem, order=order)
    expected, expected_lse = attention_ref(problem.q, problem.k, problem.v, problem.scale)
    assert out.dtype == np.float64 and out.shape == problem.q.shape
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.lse, expected_lse, rtol=RTOL, atol=ATOL)
    assert stats.kept.all() and stats.visited.all()
    assert stats.density == 1.0 and stats.sparsity == 0.0
    np.testing.assert_allclose(stats.recall_bound, 1.0, rtol=0, atol=0)


@given(problems())
def test_lse_is_log_sum_exp_of_scaled_logits(problem):
    _, stats = run(problem)
    scale = problem.effective_scale
    s = scale * np.einsum("bhid,bhjd->bhij", problem.q, expand_kv(problem.k, problem.q.shape[1]))
    # log-sum-exp written the long way (shift by the row max): a second, separate formula.
    shift = s.max(axis=-1)
    expected = shift + np.log(np.exp(s - shift[..., None]).sum(axis=-1))
    assert stats.lse.dtype == np.float64
    np.testing.assert_allclose(stats.lse, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# BlockMask


@given(problems(), st.floats(0.0, 1.0), st.booleans(), st.sampled_from(ORDERS))
def test_block_mask_equals_masked_softmax(problem, density, shared, order):
    B, H = problem.q.shape[:2]
    nq, nk = problem.n_tiles
    shape = (1, 1, nq, nk) if shared else (B, H, nq, nk)
    mask = random_tile_mask(problem.rng(1), shape, density)
    given_mask = mask[0, 0] if shared else mask
    out, stats = run(problem, select=psa.BlockMask(given_mask), order=order)
    full_mask = np.broadcast_to(mask, (B, H, nq, nk))
    expected, expected_lse = attention_ref(problem.q, problem.k, problem.v, problem.scale,
                                           full_mask, problem.block)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.lse, expected_lse, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(stats.kept, full_mask)
    np.testing.assert_array_equal(stats.visited, full_mask)
    assert stats.density == pytest.approx(full_mask.mean(), abs=1e-15)


@given(problems())
def test_all_true_mask_equals_dense(problem):
    B, H = problem.q.shape[:2]
    mask = np.ones((B, H) + problem.n_tiles, dtype=bool)
    masked, masked_stats = run(problem, select=psa.BlockMask(mask))
    dense, dense_stats = run(problem)
    # Same plan, same loop: identical, not merely close.
    np.testing.assert_array_equal(masked, dense)
    np.testing.assert_array_equal(masked_stats.lse, dense_stats.lse)


@given(problems(max_n=120))
def test_flop_density_counts_visited_qk_and_kept_pv_by_valid_size(problem):
    mask = random_tile_mask(problem.rng(2), (1, 1) + problem.n_tiles, 0.5)
    _, stats = run(problem, select=psa.BlockMask(mask[0, 0]), skip=psa.Blasst(0.05))
    Nq, Nk = problem.q.shape[2], problem.k.shape[2]
    rows = np.diff(np.minimum(np.arange(problem.n_tiles[0] + 1) * problem.block[0], Nq))
    keys = np.diff(np.minimum(np.arange(problem.n_tiles[1] + 1) * problem.block[1], Nk))
    area = rows[:, None] * keys[None, :]
    dense_cost = 2.0 * problem.q.shape[0] * problem.q.shape[1] * Nq * Nk
    spent = (stats.visited * area).sum() + (stats.kept * area).sum()
    assert stats.flop_density == pytest.approx(spent / dense_cost, rel=1e-12)
    assert stats.flop_sparsity == pytest.approx(1.0 - spent / dense_cost, abs=1e-12)
    assert stats.density == pytest.approx(stats.kept.mean(), abs=1e-15)
    assert stats.sparsity == pytest.approx(1.0 - stats.kept.mean(), abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Decomposition and padding


@given(problems(min_n=2), st.data())
def test_merging_disjoint_key_sets_by_lse_gives_the_whole(problem, data):
    Nk = problem.k.shape[2]
    in_first = problem.rng(4).random(Nk) < data.draw(st.floats(0.1, 0.9), label="share")
    in_first[0], in_first[-1] = True, False  # both parts non-empty
    parts = []
    for keys in (np.flatnonzero(in_first), np.flatnonzero(~in_first)):
        out, stats = run(problem, k=problem.k[:, :, keys], v=problem.v[:, :, keys])
        parts.append((out, stats.lse))
    (out_a, lse_a), (out_b, lse_b) = parts
    lse = np.logaddexp(lse_a, lse_b)
    merged = np.exp(lse_a - lse)[..., None] * out_a + np.exp(lse_b - lse)[..., None] * out_b
    whole, whole_stats = run(problem)
    np.testing.assert_allclose(merged, whole, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lse, whole_stats.lse, rtol=RTOL, atol=ATOL)


@given(problems(min_n=33), st.data())
def test_merging_complementary_block_masks_gives_the_whole(problem, data):
    nq, nk = problem.n_tiles  # nk >= 2: 33 keys need two tiles of at most 32
    B, H = problem.q.shape[:2]
    mask = problem.rng(5).random((B, H, nq, nk)) < data.draw(st.floats(0.2, 0.8), label="d")
    mask[..., 0], mask[..., -1] = True, False  # both halves keep a tile in every query tile
    out_a, stats_a = run(problem, select=psa.BlockMask(mask))
    out_b, stats_b = run(problem, select=psa.BlockMask(~mask))
    lse = np.logaddexp(stats_a.lse, stats_b.lse)
    merged = (np.exp(stats_a.lse - lse)[..., None] * out_a
              + np.exp(stats_b.lse - lse)[..., None] * out_b)
    whole, _ = run(problem)
    np.testing.assert_allclose(merged, whole, rtol=RTOL, atol=ATOL)


@given(problems(), st.integers(1, 3), st.sampled_from([None, "recall", "blasst"]))
def test_masked_out_key_tiles_never_change_results(problem, extra_tiles, rule):
    """Whole key tiles prepended and masked out change nothing, even with huge logits."""
    B, Hkv, Nk, D = problem.k.shape
    nq, nk = problem.n_tiles
    extra = extra_tiles * problem.block[1]
    rng = problem.rng(6)
    junk_k = 1e3 * rng.standard_normal((B, Hkv, extra, D))  # would dominate if ever visited
    junk_v = 1e6 * rng.standard_normal((B, Hkv, extra, D))
    k = np.concatenate([junk_k, problem.k], axis=2)
    v = np.concatenate([junk_v, problem.v], axis=2)
    mask = random_tile_mask(rng, (1, 1, nq, nk), 0.6)[0, 0]
    padded_mask = np.concatenate([np.zeros((nq, extra_tiles), dtype=bool), mask], axis=1)
    skip = {None: None, "recall": psa.Recall(0.9), "blasst": psa.Blasst(1e-3)}[rule]
    # Natural order keeps the visit sequence of the real tiles identical in both calls.
    out, stats = run(problem, select=psa.BlockMask(mask), skip=skip, order="natural")
    padded_out, padded_stats = run(problem, k=k, v=v, select=psa.BlockMask(padded_mask),
                                   skip=skip, order="natural")
    np.testing.assert_allclose(padded_out, out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(padded_stats.lse, stats.lse, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(padded_stats.kept[..., extra_tiles:], stats.kept)
    assert not padded_stats.visited[..., :extra_tiles].any()


@given(problems(), st.integers(1, 40))
def test_extra_query_rows_never_change_other_rows(problem, extra_rows):
    """Rows are independent under a fixed mask: appending queries changes no earlier row."""
    B, H, Nq, D = problem.q.shape
    q = np.concatenate([problem.q, 50.0 * problem.rng(7).standard_normal((B, H, extra_rows, D))],
                       axis=2)
    nq_long = n_tiles(Nq + extra_rows, problem.block[0])
    nk = problem.n_tiles[1]
    mask = random_tile_mask(problem.rng(8), (nq_long, nk), 0.5)
    longer, _ = run(problem, q=q, select=psa.BlockMask(mask))
    shorter, _ = run(problem, select=psa.BlockMask(mask[:problem.n_tiles[0]]))
    np.testing.assert_allclose(longer[:, :, :Nq], shorter, rtol=RTOL, atol=ATOL)


@given(problems(sharp=True), skip_rules_params, st.sampled_from(ORDERS))
def test_memory_past_a_view_never_changes_results(problem, rule_params, order):
    """Inputs that are views into larger NaN-filled buffers give the results of exact copies:
    the partial last tiles are padded by the library, never read past the array."""
    def poisoned_view(x):
        B, H, N, D = x.shape
        buffer = np.full((B, H, N + 37, D + 3), np.nan)
        buffer[:, :, :N, :D] = x
        return buffer[:, :, :N, :D]

    rule = make_rule(*rule_params)
    q, k, v = (poisoned_view(x) for x in (problem.q, problem.k, problem.v))
    out, stats = run(problem, q=q, k=k, v=v, skip=rule, order=order)
    copy_out, copy_stats = run(problem, skip=rule, order=order)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, copy_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(stats.kept, copy_stats.kept)


@given(problems(sharp=True), skip_rules_params, st.sampled_from([None, "mask", "topp"]))
def test_results_never_depend_on_uninitialised_memory(problem, rule_params, selector):
    """Every element of every result is written: poisoned allocations change nothing."""
    nq, nk = problem.n_tiles
    select = {
        None: None,
        "mask": psa.BlockMask(random_tile_mask(problem.rng(10), (nq, nk), 0.5)),
        "topp": psa.TopP(0.7),
    }[selector]
    rule = make_rule(*rule_params)
    do = problem.rng(11).standard_normal(problem.q.shape)

    def everything():
        out, stats = run(problem, select=select, skip=rule)
        grads = psa.attention_vjp(problem.q, problem.k, problem.v, do, kept=stats.kept,
                                  block=problem.block, scale=problem.scale, backend="reference")
        sla_out = psa.sla_attention(problem.q, problem.k, problem.v, critical=0.5,
                                    negligible=0.2, skip=rule, block=problem.block,
                                    scale=problem.scale, backend="reference",
                                    proj_weight=np.eye(problem.q.shape[-1]))
        return (out, stats.lse, stats.kept, stats.visited, stats.recall_bound, sla_out) + grads

    clean = everything()
    with poisoned_allocations():
        poisoned = everything()
    for name, a, b in zip("out lse kept visited bound sla dq dk dv".split(), clean, poisoned):
        np.testing.assert_array_equal(b, a, err_msg=name)
