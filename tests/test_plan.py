"""The public plan: builder semantics (docs/design.rst section 4), CSR invariants, the key-major
transpose, from_kept, validation of user plans, plan reuse in attention, empty rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pysparse_attn as psa
from attention_ref import attention_ref, block_scores_ref, descending, visit_order_ref

SELECTORS = {
    "dense": None,
    "topk2": psa.TopK(k=2),
    "topk_ratio": psa.TopK(ratio=0.4),
    "topp": psa.TopP(0.7),
}


def _inputs(seed, B=2, H=4, Hkv=2, Nq=75, Nk=90, D=8):
    rng = np.random.default_rng(seed)
    # Structured keys so that scores are far from ties (ties are broken by index anyway).
    q = rng.standard_normal((B, H, Nq, D))
    k = rng.standard_normal((B, Hkv, Nk, D)) + np.linspace(-2, 2, Nk)[None, None, :, None]
    v = rng.standard_normal((B, Hkv, Nk, D))
    return q, k, v


def _clustered_inputs(seed):
    """Each key tile around its own centre, each query tile near one centre: a skip rule
    drops most tiles."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 8)) * 1.5
    k = centres[np.arange(90) // 16][None, None] + 0.3 * rng.standard_normal((2, 2, 90, 8))
    near = np.repeat(rng.integers(0, 6, 5), 16)[:75]
    q = 2.0 * centres[near][None, None] + 0.3 * rng.standard_normal((2, 4, 75, 8))
    return q, k, rng.standard_normal((2, 2, 90, 8))


def _kept_tiles_ref(scores_row, selector):
    """docs/design.rst section 4's kept set of one query tile, from float64 block scores."""
    nk = len(scores_row)
    by_score = descending(scores_row)
    if selector is None:
        return list(range(nk))
    if isinstance(selector, psa.TopK):
        count = selector.k if selector.k is not None else max(1, math.floor(selector.ratio * nk))
        return by_score[:min(nk, count)]
    mass = np.exp(scores_row - scores_row.max())
    mass /= mass.sum()
    cumulative = np.cumsum(mass[by_score])
    needed = min(nk, int((cumulative < selector.p).sum()) + 1)
    return by_score[:needed]


def _rows(plan):
    """``{(b, h, i): [key tiles in visit order]}`` read straight from the CSR arrays."""
    offsets, indices = np.asarray(plan.row_offsets), np.asarray(plan.row_indices)
    return {(b, h, i): indices[b, h, offsets[b, h, i]:offsets[b, h, i + 1]].tolist()
            for b in range(plan.shape[0]) for h in range(plan.shape[1])
            for i in range(plan.nq)}


def _check_csr(plan, offsets, indices, n_lists, n_targets):
    offsets, indices = np.asarray(offsets), np.asarray(indices)
    assert offsets.dtype == np.int32 and indices.dtype == np.int32
    assert offsets.shape == plan.shape[:2] + (n_lists + 1,)
    assert indices.shape == plan.shape[:2] + (plan.capacity,)
    assert (offsets[..., 0] == 0).all()
    assert (np.diff(offsets, axis=-1) >= 0).all()
    assert (offsets[..., -1] <= plan.capacity).all()
    used = np.arange(plan.capacity) < offsets[..., -1:]
    assert ((indices >= 0) & (indices < n_targets))[used].all()
    assert (indices[~used] == -1).all()


@pytest.mark.parametrize("selector", list(SELECTORS))
@pytest.mark.parametrize("order", ["natural", "score", "peak"])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (20, 40)])
def test_builder_follows_the_selector_definition(selector, order, block):
    """Every row: the kept set and visit order of docs/design.rst sections 3-4 (partial tiles)."""
    q, k, _ = _inputs(1)
    select = SELECTORS[selector]
    plan = psa.plan(q, k, select=select, order=order, peak=2, block=block)
    scores = block_scores_ref(q, k, block)
    assert plan.shape == (2, 4, 75, 90) and plan.block == block and plan.order == order
    assert (plan.nq, plan.nk) == scores.shape[2:]
    for (b, h, i), row in _rows(plan).items():
        kept = _kept_tiles_ref(scores[b, h, i], select)
        assert row == visit_order_ref(scores[b, h, i], kept, order, peak=2), (b, h, i)
        assert len(row) <= plan.max_visits


def test_max_visits_and_capacity_come_from_the_selector():
    q, k, _ = _inputs(2)
    nk = math.ceil(90 / 16)
    nq = math.ceil(75 / 16)
    cases = [(None, nk), (psa.TopK(k=3), 3), (psa.TopK(k=50), nk), (psa.TopP(0.5), nk),
             (psa.BlockMask(np.ones((nq, nk), bool)), nk)]
    for select, bound in cases:
        plan = psa.plan(q, k, select=select, block=(16, 16))
        assert plan.max_visits == bound
        assert plan.capacity == nq * bound
        _check_csr(plan, plan.row_offsets, plan.row_indices, plan.nq, plan.nk)
        np.testing.assert_array_equal(plan.counts, np.diff(plan.row_offsets, axis=-1))


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_key_major_lists_are_the_exact_transpose(selector):
    q, k, _ = _inputs(3)
    plan = psa.plan(q, k, select=SELECTORS[selector], order="peak", block=(16, 16))
    _check_csr(plan, plan.col_offsets, plan.col_indices, plan.nk, plan.nq)
    bitmap = np.zeros((2, 4, plan.nq, plan.nk), bool)
    for (b, h, i), row in _rows(plan).items():
        bitmap[b, h, i, row] = True
    np.testing.assert_array_equal(plan.visit_bitmap(), bitmap)
    offsets, indices = plan.col_offsets, plan.col_indices
    for b in range(2):
        for h in range(4):
            for j in range(plan.nk):
                column = indices[b, h, offsets[b, h, j]:offsets[b, h, j + 1]].tolist()
                assert column == np.flatnonzero(bitmap[b, h, :, j]).tolist()


def test_from_kept_replays_a_forward_exactly():
    """A forward's kept set, as a plan, gives the same output without the rule."""
    q, k, v = _clustered_inputs(4)
    out, stats = psa.attention(q, k, v, skip=psa.Recall(0.9), block=(16, 16),
                               backend="reference", return_stats=True)
    assert 0.0 < stats.density < 1.0, "the workload should skip some tiles"
    plan = psa.Plan.from_kept(stats.kept, block=(16, 16), shape=q.shape[:3] + (k.shape[2],))
    np.testing.assert_array_equal(plan.visit_bitmap(), stats.kept)
    assert plan.order == "given" and plan.max_visits == plan.nk
    replay, replay_stats = psa.attention(q, k, v, plan=plan, backend="reference",
                                         return_stats=True)
    # Same tiles, another summation order (natural instead of peak): float64 rounding only.
    np.testing.assert_allclose(replay, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(replay_stats.kept, stats.kept)
    assert replay_stats.plan is plan


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_stats_plan_is_reusable(backend):
    q, k, v = _inputs(5)
    select = psa.TopK(ratio=0.5)
    out, stats = psa.attention(q, k, v, select=select, block=(16, 16), backend=backend,
                               return_stats=True)
    assert isinstance(stats.plan, psa.Plan)
    again = psa.attention(q, k, v, plan=stats.plan, backend=backend)
    np.testing.assert_array_equal(again, out)
    built = psa.plan(q, k, select=select, block=(16, 16))
    np.testing.assert_array_equal(psa.attention(q, k, v, plan=built, backend=backend), out)


def test_attention_vjp_reuses_a_plan():
    q, k, v = _inputs(14)
    do = np.random.default_rng(1).standard_normal(q.shape)
    options = dict(skip=psa.Blasst(0.05), block=(16, 16), backend="reference")
    _, stats = psa.attention(q, k, v, select=psa.TopK(k=3), return_stats=True, **options)
    with_plan = psa.attention_vjp(q, k, v, do, plan=stats.plan, **options)
    with_kept = psa.attention_vjp(q, k, v, do, kept=stats.kept, **options)
    for a, b in zip(with_plan, with_kept):
        np.testing.assert_array_equal(a, b)


def test_a_plan_with_a_conflicting_call_is_refused():
    q, k, v = _inputs(6)
    plan = psa.plan(q, k, select=psa.TopK(k=2), order="score", block=(16, 16))
    with pytest.raises(ValueError, match="select"):
        psa.attention(q, k, v, plan=plan, select=psa.TopK(k=2))
    with pytest.raises(ValueError, match="order"):
        psa.attention(q, k, v, plan=plan, order="natural")
    with pytest.raises(ValueError, match="block"):
        psa.attention(q, k, v, plan=plan, block=(32, 16))
    with pytest.raises(ValueError, match="shape"):
        psa.attention(q[:, :, :40], k, v, plan=plan)
    with pytest.raises(TypeError, match="plan"):
        psa.attention(q, k, v, plan=np.zeros(3))
    # Agreeing options are fine.
    psa.attention(q, k, v, plan=plan, order="score", block=(16, 16))


def test_sla_plan_reuse_and_conflicts():
    q, k, v = _inputs(7)
    weight = np.random.default_rng(0).standard_normal((8, 8)) * 0.1
    options = dict(block=(16, 16), proj_weight=weight, backend="reference")
    out, stats = psa.sla_attention(q, k, v, critical=0.3, negligible=0.3, return_stats=True,
                                   **options)
    assert stats.plan.marginal is not None
    np.testing.assert_array_equal(stats.marginal, stats.plan.marginal)
    again = psa.sla_attention(q, k, v, plan=stats.plan, **options)
    np.testing.assert_array_equal(again, out)
    with pytest.raises(ValueError, match="plan"):
        psa.sla_attention(q, k, v, plan=stats.plan, critical=0.3, negligible=0.3, **options)
    with pytest.raises(TypeError, match="critical"):
        psa.sla_attention(q, k, v, **options)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_rows_give_zero_output_and_minus_infinite_lse(backend):
    q, k, v = _inputs(8, B=1, H=2, Hkv=2)
    kept = np.ones((1, 2, 5, 6), bool)
    kept[0, 1, 2] = False
    kept[0, 0, 4] = False  # the partial last query tile
    plan = psa.Plan.from_kept(kept, block=(16, 16), shape=(1, 2, 75, 90))
    assert plan.counts[0, 1, 2] == 0
    out, stats = psa.attention(q, k, v, plan=plan, backend=backend, return_stats=True)
    np.testing.assert_array_equal(out[0, 1, 32:48], 0.0)
    np.testing.assert_array_equal(out[0, 0, 64:], 0.0)
    assert np.isneginf(stats.lse[0, 1, 32:48]).all() and np.isneginf(stats.lse[0, 0, 64:]).all()
    np.testing.assert_array_equal(stats.recall_bound[0, 1, 32:48], 1.0)
    assert not stats.kept[0, 1, 2].any() and not stats.visited[0, 1, 2].any()
    expected, _ = attention_ref(q, k, v, tile_mask=kept, block=(16, 16))
    rows = np.ones(75, bool)
    rows[64:] = False
    tol = 1e-10 if backend == "reference" else 1e-5  # the cpu backend accumulates in float32
    np.testing.assert_allclose(out[0, 0, rows], expected[0, 0, rows], rtol=tol, atol=tol)


def test_from_kept_defaults_and_errors():
    kept = np.eye(3, dtype=bool)[None, None]
    plan = psa.Plan.from_kept(kept, block=(8, 4))
    assert plan.shape == (1, 1, 24, 12)
    assert "Plan(" in repr(plan) and "order='given'" in repr(plan)
    with pytest.raises(TypeError, match="kept"):
        psa.Plan.from_kept(kept.astype(np.int8), block=(8, 4))
    with pytest.raises(ValueError, match="kept"):
        psa.Plan.from_kept(kept[0], block=(8, 4))
    with pytest.raises(ValueError, match="shape"):
        psa.Plan.from_kept(kept, block=(8, 4), shape=(1, 1, 40, 12))
    with pytest.raises(ValueError, match="order"):
        psa.Plan.from_kept(kept, block=(8, 4), order="score")


def _user_plan_fields():
    """A valid user plan of 1 x 1 x 3 query tiles x 4 key tiles, as keyword arguments."""
    return dict(shape=(1, 1, 24, 16), block=(8, 4),
                row_offsets=np.array([[[0, 2, 2, 5]]], np.int32),
                row_indices=np.array([[[3, 0, 1, 2, 0, -1]]], np.int32))


def test_a_valid_user_plan_is_accepted_and_runs():
    plan = psa.Plan(**_user_plan_fields())
    assert plan.max_visits == 4 and plan.counts.tolist() == [[[2, 0, 3]]]
    np.testing.assert_array_equal(plan.col_offsets, [[[0, 2, 3, 4, 5]]])
    np.testing.assert_array_equal(plan.col_indices, [[[0, 2, 2, 2, 0, -1]]])
    again = psa.Plan(**_user_plan_fields(), col_offsets=plan.col_offsets,
                     col_indices=plan.col_indices)
    rng = np.random.default_rng(9)
    q, k, v = rng.standard_normal((1, 1, 24, 4)), *rng.standard_normal((2, 1, 1, 16, 4))
    out = psa.attention(q, k, v, plan=again, backend="reference")
    mask = plan.visit_bitmap()
    expected, _ = attention_ref(q, k, v, tile_mask=mask, block=(8, 4))
    np.testing.assert_allclose(out[0, 0, 16:], expected[0, 0, 16:], rtol=1e-12)


def _broken(field, value, **extra):
    fields = _user_plan_fields()
    fields[field] = value
    fields.update(extra)
    return fields


BROKEN_PLANS = {
    "offsets not from 0": (_broken("row_offsets", np.array([[[1, 2, 2, 5]]], np.int32)),
                           "row_offsets"),
    "offsets decreasing": (_broken("row_offsets", np.array([[[0, 3, 2, 5]]], np.int32)),
                           "row_offsets"),
    "past capacity": (_broken("row_offsets", np.array([[[0, 2, 2, 7]]], np.int32)),
                      "row_offsets"),
    "index out of range": (_broken("row_indices", np.array([[[4, 0, 1, 2, 0, -1]]], np.int32)),
                           "row_indices"),
    "negative index": (_broken("row_indices", np.array([[[-2, 0, 1, 2, 0, -1]]], np.int32)),
                       "row_indices"),
    "not -1 after the end": (_broken("row_indices", np.array([[[3, 0, 1, 2, 0, 1]]], np.int32)),
                             "row_indices"),
    "duplicate in a row": (_broken("row_indices", np.array([[[3, 0, 1, 1, 0, -1]]], np.int32)),
                           "twice"),
    "int64 offsets": (_broken("row_offsets", np.array([[[0, 2, 2, 5]]], np.int64)),
                      "row_offsets"),
    "offsets shape": (_broken("row_offsets", np.array([[[0, 2, 5]]], np.int32)),
                      "row_offsets"),
    "bad shape": (_broken("shape", (1, 1, 24)), "shape"),
    "bad block": (_broken("block", (8, 0)), "block"),
    "bad order": (_broken("row_offsets", np.array([[[0, 2, 2, 5]]], np.int32), order="best"),
                  "order"),
    "max_visits too small": (_broken("row_offsets", np.array([[[0, 2, 2, 5]]], np.int32),
                                     max_visits=2), "max_visits"),
    "marginal shape": (_broken("row_offsets", np.array([[[0, 2, 2, 5]]], np.int32),
                               marginal=np.zeros((1, 1, 3, 3), bool)), "marginal"),
    "col lists alone": (_broken("row_offsets", np.array([[[0, 2, 2, 5]]], np.int32),
                                col_offsets=np.array([[[0, 2, 3, 4, 5]]], np.int32)),
                        "col_offsets"),
    "col lists not the transpose": (
        _broken("row_offsets", np.array([[[0, 2, 2, 5]]], np.int32),
                col_offsets=np.array([[[0, 2, 3, 4, 5]]], np.int32),
                col_indices=np.array([[[0, 2, 2, 1, 0, -1]]], np.int32)), "col_"),
}


@pytest.mark.parametrize("case", list(BROKEN_PLANS))
def test_malformed_user_plans_name_the_field(case):
    fields, field = BROKEN_PLANS[case]
    with pytest.raises(ValueError, match=field):
        psa.Plan(**fields)


def test_plan_builder_argument_errors():
    q, k, _ = _inputs(10)
    with pytest.raises(ValueError, match="order"):
        psa.plan(q, k, order="random")
    with pytest.raises(TypeError, match="select"):
        psa.plan(q, k, select="topk")
    with pytest.raises(TypeError, match="block"):
        psa.plan(q, k, block=16)
    with pytest.raises(ValueError, match="layout"):
        psa.plan(q, k, layout="nhd")


def test_plan_layouts_agree():
    q, k, _ = _inputs(11)
    a = psa.plan(q, k, select=psa.TopK(k=2), block=(16, 16))
    b = psa.plan(np.swapaxes(q, 1, 2), np.swapaxes(k, 1, 2), select=psa.TopK(k=2),
                 block=(16, 16), layout="bnhd")
    np.testing.assert_array_equal(a.row_indices, b.row_indices)
    assert a.shape == b.shape


# ---------------------------------------------------------------------------------------------
# GPU: the accelerated builder is the same method, with no host round trip.


def _separated_scores_inputs(seed, n_query_tiles, n_key_tiles, D=64, tile=64):
    """bfloat16 q, k whose block scores are far apart (about 1 between neighbours): each key
    tile is offset along one direction by a distinct multiple, and q leans on that direction,
    so float32 and float64 scores rank the tiles alike."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(D)
    q = rng.standard_normal((1, 2, n_query_tiles * tile, D)) + 0.5 * direction
    offsets = np.repeat(rng.permutation(n_key_tiles), tile)[None, None, :, None] / 4
    k = 0.1 * rng.standard_normal((1, 2, n_key_tiles * tile, D)) + offsets * direction
    return q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["dense", "topk2", "topp"])
@pytest.mark.parametrize("order", ["natural", "peak"])
def test_gpu_plan_matches_the_host_plan_on_clear_scores(selector, order):
    """Same rows as the float64 host builder where scores are well separated."""
    import cupy

    q, k = _separated_scores_inputs(12, n_query_tiles=9, n_key_tiles=9)
    select = SELECTORS[selector]
    host = psa.plan(q.astype(np.float64), k.astype(np.float64), select=select, order=order,
                    block=(64, 64))
    device = psa.plan(cupy.asarray(q), cupy.asarray(k), select=select, order=order,
                      block=(64, 64))
    assert isinstance(device.row_offsets, cupy.ndarray) and device.max_visits == host.max_visits
    assert _rows(device.to("host")) == _rows(host)
    np.testing.assert_array_equal(cupy.asnumpy(device.col_indices), host.col_indices)


@pytest.mark.gpu
@pytest.mark.parametrize("linear", ["marginal", "complement", "global"])
def test_gpu_sla_split_writes_the_critical_lists_and_the_marginal_bitmap(linear):
    import cupy

    from pysparse_attn._plan import build_plan
    from pysparse_attn._select import SlaSplit
    from pysparse_attn.backends import cupy as gpu

    q, k = _separated_scores_inputs(13, n_query_tiles=6, n_key_tiles=10)
    split = SlaSplit(0.3, 0.3)
    plan = gpu.build_plan(cupy, cupy.asarray(q), cupy.asarray(k), split, "natural", 4,
                          (64, 64), 0.125, linear)
    host = build_plan(np, q.astype(np.float32), k.astype(np.float32), split, "natural", 4,
                      (64, 64), 0.125, linear)
    assert plan.max_visits == 3
    np.testing.assert_array_equal(cupy.asnumpy(plan.row_indices), host.row_indices)
    np.testing.assert_array_equal(cupy.asnumpy(plan.marginal), host.marginal)
