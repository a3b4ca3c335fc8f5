"""Block scores and the plan-stage selectors ``TopK`` and ``TopP`` (docs/design.rst sections 3, 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pysparse_attn as psa
from attention_ref import attention_ref, block_scores_ref, visit_order_ref
from strategies import ORDERS, TOLERANCES, problems

RTOL, ATOL = TOLERANCES["float64"]
# Scores are float64 dot products of pooled means; two evaluation orders differ by ~1e-15
# relative. Decisions whose deciding values lie closer than this are accepted either way.
SCORE_TIE = 1e-9


def plan_of(problem, select, order="natural", peak=4):
    out, stats = psa.attention(problem.q, problem.k, problem.v, select=select, order=order,
                               peak=peak, block=problem.block, scale=problem.scale,
                               backend="reference", return_stats=True)
    return out, stats


def estimated_mass(scores):
    """``softmax_J`` of the block scores over the key tiles: the estimated tile mass."""
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def assert_kept_are_the_highest(values, kept, tie=SCORE_TIE):
    """Every kept tile's value is >= every dropped tile's value (up to ``tie``)."""
    lowest_kept = np.where(kept, values, np.inf).min(axis=-1)
    highest_dropped = np.where(kept, -np.inf, values).max(axis=-1)
    assert (lowest_kept >= highest_dropped - tie).all()


@given(problems())
def test_block_scores_match_the_definition(problem):
    scores = psa.block_scores(problem.q, problem.k, block=problem.block, scale=problem.scale)
    expected = block_scores_ref(problem.q, problem.k, problem.block, problem.scale)
    assert scores.shape == problem.q.shape[:2] + problem.n_tiles
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)


@given(problems(), st.data())
def test_topk_keeps_exactly_k_highest_scoring_tiles(problem, data):
    nq, nk = problem.n_tiles
    if data.draw(st.booleans(), label="by ratio"):
        ratio = data.draw(st.floats(1e-3, 1.0), label="ratio")
        select, expected_count = psa.TopK(ratio=ratio), max(1, math.floor(ratio * nk))
    else:
        k = data.draw(st.integers(1, nk + 3), label="k")
        select, expected_count = psa.TopK(k=k), min(nk, k)
    out, stats = plan_of(problem, select)
    assert (stats.kept.sum(axis=-1) == expected_count).all()
    np.testing.assert_array_equal(stats.kept, stats.visited)
    scores = block_scores_ref(problem.q, problem.k, problem.block, problem.scale)
    assert_kept_are_the_highest(scores, stats.kept)
    expected, _ = attention_ref(problem.q, problem.k, problem.v, problem.scale, stats.kept,
                                problem.block)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


@given(problems(min_n=33), st.data())
def test_topk_sets_are_nested_as_k_grows(problem, data):
    nk = problem.n_tiles[1]
    k = data.draw(st.integers(1, nk), label="k")
    _, smaller = plan_of(problem, psa.TopK(k=k))
    _, larger = plan_of(problem, psa.TopK(k=k + 1))
    assert (smaller.kept <= larger.kept).all()


def test_topk_breaks_ties_by_lower_tile_index():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 1, 32, 8))
    tile = rng.standard_normal((1, 1, 16, 8))
    k = np.concatenate([tile] * 5, axis=2)  # five identical key tiles: five equal scores
    v = rng.standard_normal(k.shape)
    _, stats = psa.attention(q, k, v, select=psa.TopK(k=2), block=(16, 16),
                             backend="reference", return_stats=True)
    expected = np.zeros((1, 1, 2, 5), dtype=bool)
    expected[..., :2] = True
    np.testing.assert_array_equal(stats.kept, expected)


@given(problems(), st.floats(1e-3, 1.0))
def test_topp_keeps_the_smallest_set_reaching_p(problem, p):
    _, stats = plan_of(problem, psa.TopP(p))
    mass = estimated_mass(block_scores_ref(problem.q, problem.k, problem.block, problem.scale))
    kept = stats.kept
    kept_mass = np.where(kept, mass, 0.0).sum(axis=-1)
    count = kept.sum(axis=-1)
    assert (count >= 1).all()
    # Reaches p (a cumulative float sum: a few ulps of slack) ...
    assert (kept_mass >= p - 1e-12).all()
    # ... by the highest-mass tiles ...
    assert_kept_are_the_highest(mass, kept)
    # ... and minimally: without its smallest tile the set falls short of p.
    smallest = np.where(kept, mass, np.inf).min(axis=-1)
    without_smallest = kept_mass - smallest
    assert ((count == 1) | (without_smallest < p + 1e-12)).all()


@given(problems(min_n=33), st.floats(1e-3, 1.0), st.floats(0.0, 1.0))
def test_topp_sets_are_nested_as_p_grows(problem, p, fraction):
    smaller_p = p * fraction
    if smaller_p <= 0.0:
        smaller_p = p
    _, smaller = plan_of(problem, psa.TopP(smaller_p))
    _, larger = plan_of(problem, psa.TopP(p))
    assert (smaller.kept <= larger.kept).all()


@given(problems())
def test_full_selectors_equal_dense(problem):
    dense, _ = plan_of(problem, None)
    for select in (psa.TopK(ratio=1.0), psa.TopK(k=problem.n_tiles[1]), psa.TopP(1.0)):
        out, stats = plan_of(problem, select)
        assert stats.kept.all(), select
        np.testing.assert_allclose(out, dense, rtol=RTOL, atol=ATOL)


@given(problems(min_n=33), st.sampled_from(ORDERS), st.integers(0, 6),
       st.sampled_from(["topk", "mask", None]))
def test_visit_order_follows_the_order_rule(problem, order, peak, selector):
    nq, nk = problem.n_tiles
    select = {
        None: None,
        "topk": psa.TopK(k=max(1, nk - 1)),
        "mask": psa.BlockMask((problem.rng(1).random((nq, nk)) < 0.7)
                              | (np.arange(nk) == 0)[None, :]),
    }[selector]
    _, stats = plan_of(problem, select, order=order, peak=peak)
    scores = block_scores_ref(problem.q, problem.k, problem.block, problem.scale)
    visit, count = np.asarray(stats.plan.visit), np.asarray(stats.plan.count)
    B, H = count.shape[:2]
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                listed = [int(j) for j in visit[b, h, i, :count[b, h, i]]]
                assert (visit[b, h, i, count[b, h, i]:] == -1).all()
                kept = np.flatnonzero(stats.visited[b, h, i])
                assert sorted(listed) == list(kept)
                row = scores[b, h, i]
                expected = visit_order_ref(row, kept, order, peak)
                if listed != expected:
                    # Only a near-tie in the scores may reorder tiles.
                    differing = [a for a, e in zip(listed, expected) if a != e]
                    spread = np.ptp(row[differing])
                    assert spread <= SCORE_TIE * max(1.0, np.abs(row).max()), (listed, expected)


@pytest.mark.parametrize("order", ORDERS)
def test_dense_result_does_not_depend_on_the_order(order):
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 2, 75, 12)) for _ in range(3))
    out = psa.attention(q, k, v, order=order, block=(16, 16), backend="reference")
    expected, _ = attention_ref(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("p, block_k, n_keys", [(0.1, 64, 32760), (1.0, 64, 64), (0.5, 16, 17)])
def test_cef_from_mass_is_the_log_of_a_uniform_share(p, block_k, n_keys):
    """``Cef.from_mass(p, Bk, Nk)`` is ``Cef(ln p + ln(Bk / Nk))`` (docs/design.rst section 5)."""
    assert psa.Cef.from_mass(p, block_k, n_keys).lam == pytest.approx(
        math.log(p) + math.log(block_k / n_keys), rel=1e-15, abs=1e-15)
