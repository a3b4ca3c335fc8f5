"""SLA: the three-way split, the sparse branch and the linear branch (DESIGN.md section 6)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import pysparse_attn as psa
from pysparse_attn import _reference
from attention_ref import (
    attention_ref,
    block_scores_ref,
    linear_branch_ref,
    linear_branch_total_minus_rest_ref,
    linear_denominators,
)
from strategies import TOLERANCES, make_rule, problems, skip_rules_params

RTOL, ATOL = TOLERANCES["float64"]
LINEAR_MODES = ["marginal", "complement", "global"]
FEATURE_MAPS = ["softmax", "elu1", "relu"]
SCORE_TIE = 1e-9

shares = st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 0.99))
"""``(critical, negligible)`` shares."""


def sla(problem, critical, negligible, **options):
    return psa.sla_attention(problem.q, problem.k, problem.v, critical=critical,
                             negligible=negligible, block=problem.block, scale=problem.scale,
                             backend="reference", return_stats=True, **options)


def descending_rank(scores):
    """Rank of each tile by descending score (0 = highest), ties to the lower index."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(scores.shape[-1]), axis=-1)
    return rank


def expected_split(problem, critical, negligible, linear):
    """``(critical tiles, marginal tiles)`` from the block scores, as DESIGN.md section 4 says."""
    nk = problem.n_tiles[1]
    scores = block_scores_ref(problem.q, problem.k, problem.block, problem.scale)
    rank = descending_rank(scores)
    n_critical = max(1, math.floor(critical * nk))
    n_negligible = math.floor(negligible * nk)
    is_critical = rank < n_critical
    if linear == "marginal":
        is_marginal = ~is_critical & (rank < nk - n_negligible)
    elif linear == "complement":
        is_marginal = ~is_critical
    else:
        is_marginal = np.ones_like(is_critical)
    return is_critical, is_marginal, scores


def assert_same_split(actual, expected, scores):
    """Equal tile sets, except that tiles whose score ties a boundary may trade places."""
    differ = actual != expected
    if differ.any():
        for b, h, i in zip(*np.nonzero(differ.any(axis=-1))):
            row = scores[b, h, i]
            spread = np.ptp(row[differ[b, h, i]])
            assert spread <= SCORE_TIE * max(1.0, np.abs(row).max()), (b, h, i)


@given(problems(), shares, st.sampled_from(LINEAR_MODES), st.sampled_from(FEATURE_MAPS))
def test_untrained_sla_equals_sparse_attention_over_the_critical_set(problem, split, linear,
                                                                      feature_map):
    critical, negligible = split
    out, stats = sla(problem, critical, negligible, linear=linear, feature_map=feature_map)
    is_critical, is_marginal, scores = expected_split(problem, critical, negligible, linear)
    assert_same_split(stats.kept, is_critical, scores)
    assert_same_split(stats.marginal, is_marginal, scores)
    np.testing.assert_array_equal(stats.kept, stats.visited)
    if linear != "global":
        assert not (stats.kept & stats.marginal).any(), "a tile is both critical and marginal"
    expected, expected_lse = attention_ref(problem.q, problem.k, problem.v, problem.scale,
                                           stats.kept, problem.block)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.lse, expected_lse, rtol=RTOL, atol=ATOL)
    # W = 0 and b = 0 given explicitly is the same function.
    D = problem.q.shape[-1]
    zero_out, _ = sla(problem, critical, negligible, linear=linear, feature_map=feature_map,
                      proj_weight=np.zeros((D, D)), proj_bias=np.zeros(D))
    np.testing.assert_allclose(zero_out, out, rtol=RTOL, atol=ATOL)


@given(problems(), shares, st.sampled_from(LINEAR_MODES), st.sampled_from(FEATURE_MAPS),
       st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_linear_branch_equals_the_direct_sum(problem, split, linear, feature_map, eps):
    critical, negligible = split
    D = problem.q.shape[-1]
    rng = problem.rng(1)
    weight = rng.standard_normal((D, D))
    bias = rng.standard_normal(D)
    out, stats = sla(problem, critical, negligible, linear=linear, feature_map=feature_map,
                     eps=eps, proj_weight=weight, proj_bias=bias)
    sparse, _ = attention_ref(problem.q, problem.k, problem.v, problem.scale, stats.kept,
                              problem.block)
    used_eps = eps if eps is not None else (1e-5 if linear == "global" else 0.0)
    o_linear = linear_branch_ref(problem.q, problem.k, problem.v, stats.marginal, problem.block,
                                 feature_map, used_eps)
    expected = sparse + o_linear @ weight.T + bias
    # W mixes D terms of size |O_l| * |W| ~ 3: allow D times the float64 tolerance.
    np.testing.assert_allclose(out, expected, rtol=RTOL * D, atol=ATOL * D)


@given(problems(), shares, st.sampled_from(FEATURE_MAPS))
def test_identity_projection_adds_exactly_the_linear_branch(problem, split, feature_map):
    critical, negligible = split
    D = problem.q.shape[-1]
    plain, stats = sla(problem, critical, negligible, feature_map=feature_map)
    with_linear, _ = sla(problem, critical, negligible, feature_map=feature_map,
                         proj_weight=np.eye(D))
    o_linear = linear_branch_ref(problem.q, problem.k, problem.v, stats.marginal, problem.block,
                                 feature_map, 0.0)
    np.testing.assert_allclose(with_linear - plain, o_linear, rtol=RTOL, atol=ATOL)
    # Query tiles with no marginal tile get no linear contribution at all.
    nq_rows = np.repeat(~stats.marginal.any(axis=-1), problem.block[0], axis=2)
    no_marginal_rows = nq_rows[:, :, :problem.q.shape[2]]
    assert (with_linear[no_marginal_rows] == plain[no_marginal_rows]).all()


@given(problems(), st.floats(0.0, 1.0), st.sampled_from(FEATURE_MAPS),
       st.floats(0.0, 1.0))
def test_total_minus_rest_equals_the_direct_sum(problem, density, feature_map, eps):
    """Both ways of forming H and Z (DESIGN.md section 6) agree with the direct sum."""
    nq, nk = problem.n_tiles
    marginal = problem.rng(2).random(problem.q.shape[:2] + (nq, nk)) < density
    direct = linear_branch_ref(problem.q, problem.k, problem.v, marginal, problem.block,
                               feature_map, eps)
    ours = linear_branch_total_minus_rest_ref(problem.q, problem.k, problem.v, marginal,
                                              problem.block, feature_map, eps)
    # Total minus rest subtracts partial sums of the all-keys total: its absolute error is
    # ~1e-16 of the total, so a row is well conditioned when its own denominator is not tiny
    # next to the total's. Where relu zeroes the marginal denominator exactly (0/0, defined as
    # 0) the subtraction leaves rounding noise: those rows are excluded, not the whole test.
    marginal_den, total_den = linear_denominators(problem.q, problem.k, marginal,
                                                  problem.block, feature_map)
    no_marginal_tile = np.repeat(~marginal.any(axis=-1), problem.block[0], axis=2)
    conditioned = ((marginal_den + eps > 1e-6 * total_den)
                   | no_marginal_tile[:, :, :problem.q.shape[2]])
    np.testing.assert_allclose(ours[conditioned], direct[conditioned], rtol=1e-8, atol=1e-8)
    for method in ("direct", "total_minus_rest"):
        library = _reference.linear_branch(problem.q, problem.k, problem.v, marginal,
                                           problem.block, feature_map, eps, method=method)
        rows = conditioned if method == "total_minus_rest" else np.ones_like(conditioned)
        np.testing.assert_allclose(library[rows], direct[rows], rtol=1e-8, atol=1e-8,
                                   err_msg=method)


def test_bias_alone_is_added_to_the_sparse_output():
    """proj_bias without proj_weight: O = O_s + b (W is zero by default)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 40, 8)) for _ in range(3))
    bias = rng.standard_normal(8)
    common = dict(critical=0.5, negligible=0.0, block=(16, 16), backend="reference")
    plain = psa.sla_attention(q, k, v, **common)
    with_bias = psa.sla_attention(q, k, v, proj_bias=bias, **common)
    np.testing.assert_allclose(with_bias, plain + bias, rtol=RTOL, atol=ATOL)


def test_eps_defaults():
    """eps=None is 0 for the marginal and complement branches and 1e-5 for the global one."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 70, 8)) for _ in range(3))
    weight = rng.standard_normal((8, 8))
    common = dict(critical=0.3, negligible=0.2, block=(16, 16), backend="reference",
                  proj_weight=weight, feature_map="relu")
    for linear, default in (("marginal", 0.0), ("complement", 0.0), ("global", 1e-5)):
        implicit = psa.sla_attention(q, k, v, linear=linear, **common)
        explicit = psa.sla_attention(q, k, v, linear=linear, eps=default, **common)
        np.testing.assert_array_equal(implicit, explicit, err_msg=linear)
    shifted = psa.sla_attention(q, k, v, linear="global", eps=1e-1, **common)
    assert not np.allclose(shifted, implicit), "eps has no effect: the comparison is vacuous"


@given(problems(sharp=True), shares, skip_rules_params)
def test_skip_rule_acts_inside_the_critical_set(problem, split, rule_params):
    critical, negligible = split
    D = problem.q.shape[-1]
    weight = problem.rng(4).standard_normal((D, D))
    out, stats = sla(problem, critical, negligible, skip=make_rule(*rule_params),
                     proj_weight=weight)
    _, plain_stats = sla(problem, critical, negligible)
    np.testing.assert_array_equal(stats.visited, plain_stats.kept)
    assert (stats.kept <= stats.visited).all()
    np.testing.assert_array_equal(stats.marginal, plain_stats.marginal)
    sparse, _ = attention_ref(problem.q, problem.k, problem.v, problem.scale, stats.kept,
                              problem.block)
    o_linear = linear_branch_ref(problem.q, problem.k, problem.v, stats.marginal, problem.block,
                                 "softmax", 0.0)
    np.testing.assert_allclose(out, sparse + o_linear @ weight.T, rtol=RTOL * D, atol=ATOL * D)
