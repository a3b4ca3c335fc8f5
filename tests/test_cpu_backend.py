"""The C++/OpenMP CPU backend (``backends/cpu.py`` + ``cpu/``): what the contract suite does not cover.

The forward's contract (output on its kept set, decisions within a margin, every dtype and
layout) is checked by ``test_contract.py``; Recall's certificate, skipping on peaked data and
per-head parameters by ``test_rules.py``. Here: gradients and the SLA linear branch against
the reference, every output element written, empty plan rows, float64 stats, ``out_dtype``,
thread-count independence, concurrent calls, the public API with ``backend="cpu"``, argument
errors and 16-bit rounding.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from contract import csr_plan
from strategies import TOLERANCES, make_rule, problems, random_tile_mask, skip_rules_params

import pysparse_attn as psa
from pysparse_attn import _reference
from pysparse_attn._plan import build_plan
from pysparse_attn._select import BlockMask, TopK, TopP
from pysparse_attn.backends import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason=f"CPU backend not built: {cpu.unavailable_reason()}")

DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
LAYOUTS = ["bhnd", "bnhd", "strided"]
# float64 inputs accumulate in float64: LSE and the recall bound to ~1e-14 relative.
FLOAT64_STATS_TOLERANCE = 1e-12
# Gradients, relative to the largest reference entry (+1 so that gradients that vanish in exact
# arithmetic, e.g. an SLA row fed by a single key, are compared absolutely): float32
# accumulation over <= 200 keys of products of O(10) terms ~1e-6; float64 ~1e-14.
GRAD_TOLERANCE = {"float32": 2e-5, "float64": 1e-10}


def exact(x):
    """float64 copy of the values a backend actually reads (after rounding to its dtype)."""
    return np.asarray(x, dtype=np.float64)


def laid_out(x, dtype, layout):
    """``x`` (float64, canonical) rounded to ``dtype`` and seen through ``layout``'s strides.

    ``bnhd`` is the flash-attn layout seen as a transposed view; ``strided`` has a negative
    stride along N and a stride of 2 along D, so no kernel may assume contiguous rows.
    """
    x = x.astype(dtype)
    if layout == "bhnd":
        return np.ascontiguousarray(x)
    if layout == "bnhd":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    buffer = np.zeros(x.shape[:3] + (2 * x.shape[3],), dtype=dtype)
    buffer[..., ::2] = x[:, :, ::-1]
    view = buffer[:, :, ::-1, ::2]
    assert view.strides[2] < 0 and not view.flags.c_contiguous
    return view


def inputs(problem, dtype, layout):
    q, k, v = (laid_out(x, DTYPES[dtype], layout) for x in (problem.q, problem.k, problem.v))
    return (q, k, v), tuple(exact(x) for x in (q, k, v))


def make_selector(kind, problem):
    nq, nk = problem.n_tiles
    if kind is None:
        return None
    if kind == "topk":
        return TopK(k=max(1, nk // 2))
    if kind == "topp":
        return TopP(0.8)
    B, H = problem.q.shape[:2]
    return BlockMask(random_tile_mask(problem.rng(1), (B, H, nq, nk), 0.5))


def logit_error(q, k, scale, dtype):
    """Absolute error that float32 logits can carry: a few ulps of the largest |q.k| scaled.

    Each logit s = scale * q.k is formed in float32 with an error of a few ulps of
    scale * sum_d |q_d k_d| (sharp problems reach |s| ~ 100s); the LSE moves by as much and P,
    hence O, by that times max|v|. Zero for float64, which accumulates in float64.
    """
    if dtype == "float64":
        return 0.0
    group = q.shape[1] // k.shape[1]
    k_abs = np.repeat(np.abs(k), group, axis=1)
    largest = (abs(scale) * np.abs(q) @ np.swapaxes(k_abs, -1, -2)).max()
    return 8 * 2.0**-24 * largest


def assert_close(actual, expected, dtype, what, extra_atol=0.0):
    rtol, atol = TOLERANCES["float64" if dtype == "float64" else dtype]
    np.testing.assert_allclose(exact(actual), expected, rtol=rtol, atol=atol + extra_atol,
                               err_msg=what)


def assert_grads_close(actual, expected, dtype, what, term_scale=0.0):
    tol = GRAD_TOLERANCE["float64" if dtype == "float64" else "float32"]
    for name, a, b in zip(("dq", "dk", "dv"), actual, expected):
        assert a.shape == b.shape, f"{what} {name} shape"
        bound = tol * (np.abs(b).max() + term_scale + 1.0)
        error = np.abs(exact(a) - b).max()
        assert error <= bound, f"{what} {name}: max error {error:.3g} > {bound:.3g}"


def peaked_problem(seed, n=300, dim=32, block=(32, 32)):
    """Keys in tiles of very different gains: most tiles hold little mass."""
    from strategies import Problem, random_qkv

    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, 1, 2, 1, n, n, dim, 3.0, 1.5, block[1])
    return Problem(q=q, k=k, v=v, block=block, scale=None, seed=seed)


@given(problem=problems(max_n=120), dtype=st.sampled_from(list(DTYPES)),
       layout=st.sampled_from(LAYOUTS), density=st.floats(0.1, 1.0))
def test_attention_backward_matches_reference(problem, dtype, layout, density):
    (q, k, v), (q64, k64, v64) = inputs(problem, dtype, layout)
    rng = problem.rng(2)
    do = laid_out(rng.standard_normal(problem.q.shape), DTYPES[dtype], layout)
    nq, nk = problem.n_tiles
    kept = random_tile_mask(rng, (q.shape[0], q.shape[1], nq, nk), density)
    scale = problem.effective_scale
    grads = cpu.attention_backward(q, k, v, do, kept, problem.block, scale)
    expected = _reference.attention_backward(q64, k64, v64, exact(do), kept, problem.block,
                                             scale)
    accumulator = np.float64 if dtype == "float64" else np.float32
    assert all(g.dtype == accumulator for g in grads)
    assert_grads_close(grads, expected, dtype, "attention backward")


@given(problem=problems(max_n=120), dtype=st.sampled_from(list(DTYPES)),
       layout=st.sampled_from(LAYOUTS), feature_map=st.sampled_from(["softmax", "elu1", "relu"]),
       density=st.floats(0.0, 1.0), eps=st.sampled_from([0.0, 1e-5, 0.5]))
def test_linear_branch_and_its_gradient_match_reference(problem, dtype, layout, feature_map,
                                                        density, eps):
    (q, k, v), (q64, k64, v64) = inputs(problem, dtype, layout)
    rng = problem.rng(3)
    nq, nk = problem.n_tiles
    marginal = rng.random((q.shape[0], q.shape[1], nq, nk)) < density
    out = cpu.linear_branch(q, k, v, marginal, problem.block, feature_map, eps)
    expected = _reference.linear_branch(q64, k64, v64, marginal, problem.block, feature_map, eps)
    # O_l is a ratio of sums of positive-weighted values: relative float32 rounding ~1e-6 of
    # the inputs' magnitude, except relu rows whose denominator nearly cancels; compare
    # relative to the largest entry of the row block.
    tol = GRAD_TOLERANCE["float64" if dtype == "float64" else "float32"]
    assert np.abs(exact(out) - expected).max() <= tol * (np.abs(expected).max() + 1.0)

    d_linear = rng.standard_normal(q.shape).astype(np.float32)
    grads = cpu.linear_backward(q, k, v, marginal, problem.block, feature_map, eps, d_linear)
    expected = _reference.linear_backward(q64, k64, v64, marginal, problem.block, feature_map,
                                          eps, d_linear)
    slack = linear_gradient_scale(q64, k64, v64, marginal, problem.block, feature_map, eps,
                                  d_linear)
    assert_grads_close(grads, expected, dtype, f"linear backward ({feature_map})", slack)


def linear_gradient_scale(q, k, v, marginal, block, feature_map, eps, d_linear):
    """Magnitude of the terms that cancel in the linear branch's gradient.

    d phi(q_i) = d_num_i H_I^T + d_den_i Z_I with terms of size ~|g_i| max|v| max(Z_I) / den_i
    that cancel exactly when, e.g., one key feeds the branch (O_l = v is then constant). The
    float32 rounding of each term, not the size of the result, bounds the error; relu and
    small denominators make these terms large.
    """
    phi_q = _reference.feature_map_forward(q, feature_map)
    phi_k = _reference.feature_map_forward(k, feature_map)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    nk = -(-Nk // block[1])
    pad = nk * block[1] - Nk
    z_tiles = np.pad(phi_k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(
        B, k.shape[1], nk, block[1], -1).sum(axis=3)
    z_tiles = np.repeat(z_tiles, H // k.shape[1], axis=1)
    z_rows = np.repeat(np.einsum("bhij,bhja->bhia", marginal, z_tiles), block[0], axis=2)[:, :, :Nq]
    den = (phi_q * z_rows).sum(axis=-1) + eps
    usable = den > 0
    size = np.abs(d_linear).sum(axis=-1) * np.abs(v).max() * z_rows.max(axis=-1)
    return float((size[usable] / den[usable]).max(initial=0.0))


def softmax_gradient_scale(q, k, v, do, kept, block, scale):
    """Magnitude of the terms that cancel in the softmax branch's dq and dk.

    dS = P o (dP - delta) with dP_ij = dO_i.v_j and delta_i = dO_i.o_i: both are O(|dO||v|) and
    cancel exactly when, e.g., a row sees a single key (o = v, dS = 0, zero gradients). float32
    rounds each of them, so the error is bounded by scale * sum P (|dP| + |delta|) |q| (dk) or
    |k| (dq), not by the size of the result. float64 inputs, ``kept`` the tiles that entered P.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale  # the library's default
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(x, group, axis=1) for x in (k, v))
    Nq, Nk = q.shape[2], k.shape[2]
    tokens = np.repeat(np.repeat(kept, block[0], axis=2), block[1], axis=3)[:, :, :Nq, :Nk]
    logits = np.where(tokens, scale * q @ np.swapaxes(k, -1, -2), -np.inf)
    peak = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    p = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    d_p = do @ np.swapaxes(v, -1, -2)
    delta = (do * (p @ v)).sum(axis=-1, keepdims=True)
    terms = p * (np.abs(d_p) + np.abs(delta))
    dq_size = np.abs(scale) * terms @ np.abs(k)
    dk_size = np.abs(scale) * np.swapaxes(terms, -1, -2) @ np.abs(q)
    return float(max(dq_size.max(initial=0.0), dk_size.max(initial=0.0)))


def test_every_output_element_is_written():
    """Outputs prefilled with NaN come back finite (the extension writes each element)."""
    from pysparse_attn import _cpu

    rng = np.random.default_rng()
    B, H, Hkv, Nq, Nk, D, block = 2, 4, 2, 37, 53, 19, (16, 8)
    q = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32) for _ in range(2))
    plan = build_plan(np, q, k, TopK(k=3), "peak", 2, block, 0.3)
    out = np.full(q.shape, np.nan, np.float32)
    lse, bound = np.full((2, B, H, Nq), np.nan, np.float32)
    kept = np.zeros((B, H, plan.nq, plan.nk), bool)
    visited = np.zeros_like(kept)
    _cpu.forward(q, k, v, np.ascontiguousarray(plan.row_offsets, np.int32),
                 np.ascontiguousarray(plan.row_indices, np.int32), block, "psa::RecallRule",
                 np.full(H, 0.25), 0.3, out, lse, kept, visited, bound, 0)
    assert np.isfinite(out).all() and np.isfinite(lse).all() and np.isfinite(bound).all()
    marginal = rng.random(kept.shape) < 0.5
    marginal[0, 0] = False  # a head with no marginal tile must get zero rows, not stale data
    poisoned = [np.full(s, np.nan, np.float32) for s in (q.shape, k.shape, k.shape)]
    _cpu.backward(q, k, v, q, kept | visited, block, 0.3, *poisoned, 0)
    assert all(np.isfinite(g).all() for g in poisoned)
    o_linear = np.full(q.shape, np.nan, np.float32)
    _cpu.linear_forward(q, k, v, marginal.view(np.uint8), block, "elu1", 0.0, o_linear, 0)
    assert np.isfinite(o_linear).all() and (o_linear[0, 0] == 0).all()
    poisoned = [np.full(s, np.nan, np.float32) for s in (q.shape, k.shape, k.shape)]
    _cpu.linear_backward(q, k, v, marginal.view(np.uint8), block, "elu1", 0.0, q, *poisoned, 0)
    assert all(np.isfinite(g).all() for g in poisoned)


def test_results_do_not_depend_on_thread_count():
    """Each task owns its outputs, so 1 and 2 threads give bitwise-identical results."""
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((2, 3, 150, 24)).astype(np.float32) for _ in range(3))
    plan = build_plan(np, q, k, None, "peak", 4, (32, 16), 0.2)
    one = cpu.forward(q, k, v, plan, psa.Recall(0.9), 0.2, True, threads=1)
    two = cpu.forward(q, k, v, plan, psa.Recall(0.9), 0.2, True, threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    kept = one[2]
    grads_one = cpu.attention_backward(q, k, v, q, kept, (32, 16), 0.2, threads=1)
    grads_two = cpu.attention_backward(q, k, v, q, kept, (32, 16), 0.2, threads=2)
    for a, b in zip(grads_one, grads_two):
        np.testing.assert_array_equal(a, b)


def test_concurrent_calls_from_python_threads():
    """The GIL is released in the kernels; concurrent calls stay correct (no shared state)."""
    rng = np.random.default_rng()
    problems_ = [tuple(rng.standard_normal((1, 2, 97, 16)).astype(np.float32) for _ in range(3))
                 for _ in range(4)]
    expected = [cpu.forward(q, k, v, build_plan(np, q, k, None, "natural", 4, (16, 16), 0.25),
                            None, 0.25, False)[0] for q, k, v in problems_]
    results = [None] * len(problems_)

    def work(i):
        q, k, v = problems_[i]
        plan = build_plan(np, q, k, None, "natural", 4, (16, 16), 0.25)
        results[i] = cpu.forward(q, k, v, plan, None, 0.25, False, threads=1)[0]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(problems_))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


@given(problem=problems(sharp=True, max_n=150), dtype=st.sampled_from(list(DTYPES)),
       layout=st.sampled_from(["bhnd", "bnhd"]), rule=st.one_of(st.none(), skip_rules_params),
       selector=st.sampled_from([None, "topk", "topp"]))
def test_public_api_with_backend_cpu(problem, dtype, layout, rule, selector):
    """``psa.attention(..., backend="cpu")`` agrees with the reference on its kept set."""
    q, k, v = (x.astype(DTYPES[dtype]) for x in (problem.q, problem.k, problem.v))
    if layout == "bnhd":
        q, k, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    skip = make_rule(*rule) if rule is not None else None
    out, stats = psa.attention(q, k, v, select=make_selector(selector, problem), skip=skip,
                               block=problem.block, scale=problem.scale, layout=layout,
                               backend="cpu", return_stats=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    canon = (lambda x: x.transpose(0, 2, 1, 3)) if layout == "bnhd" else (lambda x: x)
    q64, k64, v64 = (exact(canon(x)) for x in (q, k, v))
    ref_out, _ = _reference.masked_attention(q64, k64, v64, stats.kept, problem.block,
                                             problem.effective_scale)
    assert_close(canon(out), ref_out, dtype, "public API output vs reference on its kept set",
                 logit_error(q64, k64, problem.effective_scale, dtype) * np.abs(v64).max())


@given(problem=problems(max_n=100), critical=st.floats(0.1, 1.0), negligible=st.floats(0, 0.9),
       feature_map=st.sampled_from(["softmax", "elu1", "relu"]))
def test_public_sla_and_vjps_with_backend_cpu(problem, critical, negligible, feature_map):
    q, k, v = (x.astype(np.float32) for x in (problem.q, problem.k, problem.v))
    D = q.shape[-1]
    rng = problem.rng(4)
    weight = rng.standard_normal((D, D)) * 0.3
    do = rng.standard_normal(q.shape).astype(np.float32)
    options = dict(critical=critical, negligible=negligible, feature_map=feature_map,
                   proj_weight=weight, block=problem.block, scale=problem.scale)
    out, stats = psa.sla_attention(q, k, v, backend="cpu", return_stats=True, **options)
    ref = psa.sla_attention(q, k, v, backend="reference", **options)
    assert_close(out, exact(ref), "float32", "sla_attention")
    grads = psa.sla_vjp(q, k, v, do, backend="cpu", **options)
    ref_grads = psa.sla_vjp(q, k, v, do, backend="reference", **options)
    q64, k64, v64 = (exact(x) for x in (q, k, v))
    term_scale = linear_gradient_scale(q64, k64, v64, stats.marginal, problem.block,
                                       feature_map, 0.0, exact(do) @ weight)
    term_scale += softmax_gradient_scale(q64, k64, v64, exact(do), np.asarray(stats.kept),
                                         problem.block, problem.scale)
    assert_grads_close(grads[:3], [exact(g) for g in ref_grads[:3]], "float32", "sla_vjp",
                       term_scale)
    for got, want in zip(grads[3:], ref_grads[3:]):
        assert np.abs(exact(got) - want).max() <= 1e-4 * (np.abs(want).max() + 1.0)
    att = psa.attention_vjp(q, k, v, do, block=problem.block, scale=problem.scale,
                            backend="cpu")
    ref_att = psa.attention_vjp(q, k, v, do, block=problem.block, scale=problem.scale,
                                backend="reference")
    every_tile = np.ones(stats.kept.shape, bool)
    assert_grads_close(att, [exact(g) for g in ref_att], "float32", "attention_vjp",
                       softmax_gradient_scale(q64, k64, v64, exact(do), every_tile,
                                              problem.block, problem.scale))


def test_bad_arguments_name_the_argument():
    rng = np.random.default_rng()
    q = rng.standard_normal((1, 2, 10, 8)).astype(np.float32)
    plan = build_plan(np, q, q, None, "natural", 4, (4, 4), 0.3)
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        cpu.forward(q, q.astype(np.float64), q, plan, None, 0.3, False)
    with pytest.raises(TypeError, match="q must be one of"):
        cpu.forward(q.astype(np.int32), q, q, plan, None, 0.3, False)
    with pytest.raises(ValueError, match="threads"):
        cpu.forward(q, q, q, plan, None, 0.3, False, threads=0)
    with pytest.raises(ValueError, match="heads"):
        cpu.forward(q, q[:, :1].repeat(3, axis=1), q[:, :1].repeat(3, axis=1), plan, None,
                    0.3, False)
    broken = build_plan(np, q, q, None, "natural", 4, (4, 4), 0.3)
    broken.row_indices[0, 0, 0] = 99  # a trusted plan corrupted after construction
    with pytest.raises(ValueError, match="plan"):
        cpu.forward(q, q, q, broken, None, 0.3, False)
    with pytest.raises(TypeError, match="skip"):
        cpu.forward(q, q, q, plan, "psa::BlasstRule", 0.3, False)
    with pytest.raises(ValueError, match="skip"):
        cpu.forward(q, q, q, plan, psa.Blasst(np.array([0.1, 0.2, 0.3])), 0.3, False)
    with pytest.raises(TypeError, match="out_dtype"):
        cpu.forward(q, q, q, plan, None, 0.3, False, out_dtype=np.float16)
    rows = [[[[0, 1, 2]] * 3] * 2]
    broken = csr_plan(rows, (4, 4))
    broken.row_indices[0, 0, 0] = 99
    with pytest.raises(ValueError, match="plan.row_indices"):
        cpu.forward(q, q, q, broken, None, 0.3, False)
    broken = csr_plan(rows, (4, 4))
    broken.row_offsets[0, 1, 1] = 7  # a row ending past the next one's start
    with pytest.raises(ValueError, match="plan.row_offsets"):
        cpu.forward(q, q, q, broken, None, 0.3, False)
    with pytest.raises(ValueError, match="feature_map"):
        cpu.linear_branch(q, q, q, np.ones((1, 2, 3, 3), bool), (4, 4), "tanh", 0.0)
    with pytest.raises(TypeError, match="marginal"):
        cpu.linear_branch(q, q, q, np.ones((1, 2, 3, 3), np.int8), (4, 4), "relu", 0.0)
    with pytest.raises(ValueError, match="kept"):
        cpu.attention_backward(q, q, q, q, np.zeros((1, 2, 3, 3), bool), (4, 4), 0.3)
    with pytest.raises(TypeError, match="do"):
        cpu.attention_backward(q, q, q, q.astype(np.float64), np.ones((1, 2, 3, 3), bool),
                               (4, 4), 0.3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_inputs_widen_and_round_like_numpy(dtype):
    """With q = 0 and two keys, O = (v1 + v2) * 0.5 in float32, then rounded to the dtype.

    Every computed step is exact or one IEEE float32 operation, so the result must equal
    NumPy's/ml_dtypes' own round-to-nearest-even exactly: the first row checks every finite
    16-bit value (v1 = v2 = v), the second random pairs (rounding ties included).
    """
    rng = np.random.default_rng()
    dt = DTYPES[dtype]
    every = np.arange(1 << 16, dtype=np.uint16).view(dt)
    # Finite values whose double is finite in float32 too (bfloat16 reaches float32's max).
    every = every[np.abs(every.astype(np.float32)) <= np.finfo(np.float32).max / 2]
    D = every.size
    pairs = rng.integers(0, 1 << 16, size=(2, D), dtype=np.uint16).view(dt)
    pairs = np.where(np.isfinite(pairs.astype(np.float32)), pairs, dt.type(1.0))
    # Keep sums finite: halve the magnitudes of the random pairs.
    pairs = (pairs.astype(np.float32) * 0.5).astype(dt)
    for v1, v2 in ((every, every), (pairs[0], pairs[1])):
        v = np.stack([v1, v2])[None, None]           # (1, 1, 2, D)
        q = np.zeros((1, 1, 1, D), dtype=dt)
        plan = build_plan(np, q, v, None, "natural", 4, (1, 2), 1.0)
        out = cpu.forward(q, np.zeros_like(v), v, plan, None, 1.0, False)[0]
        expected = ((v1.astype(np.float32) + v2.astype(np.float32)) * np.float32(0.5)).astype(dt)
        # Compared as values: the accumulator starts at +0, so -0 inputs may come back as +0.
        np.testing.assert_array_equal(out[0, 0, 0].astype(np.float32),
                                      expected.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("backend", [cpu, reference], ids=["cpu", "reference"])
def test_rows_with_no_visited_tile_give_zero_output_and_minus_infinity_lse(dtype, backend):
    """An empty plan row: O = 0, LSE = -inf, recall bound 1, nothing visited or kept; every
    other row is exact attention on its own tiles."""
    rng = np.random.default_rng()
    B, H, Hkv, Nq, Nk, D, block = 1, 2, 1, 37, 45, 8, (16, 16)  # nq = nk = 3, partial tiles
    q = rng.standard_normal((B, H, Nq, D)).astype(DTYPES[dtype])
    k, v = (rng.standard_normal((B, Hkv, Nk, D)).astype(DTYPES[dtype]) for _ in range(2))
    rows = [[[[], [2, 0], [1]], [[0, 1, 2], [], []]]]
    plan = csr_plan(rows, block)
    out, lse, kept, visited, bound = backend.forward(q, k, v, plan, psa.Recall(0.9), 0.3, True)
    empty = np.zeros((B, H, Nq), dtype=bool)
    empty[0, 0, :16] = empty[0, 1, 16:] = True
    assert (exact(out)[empty] == 0).all()
    assert (lse[empty] == -np.inf).all() and (bound[empty] == 1).all()
    assert not visited[0, 0, 0].any() and not visited[0, 1, 1:].any()
    assert not kept[0, 0, 0].any() and not kept[0, 1, 1:].any()
    ref_out, ref_lse = _reference.masked_attention(exact(q), exact(k), exact(v), kept, block,
                                                   0.3)
    assert_close(out[~empty], ref_out[~empty], dtype, "non-empty rows")
    assert np.isfinite(lse[~empty]).all()


def test_float64_inputs_give_float64_stats():
    """float64 in, float64 everywhere: O, LSE and the recall bound agree with the float64
    reference to rounding (not to float32's 1e-7)."""
    problem = peaked_problem(int(np.random.SeedSequence().entropy % (1 << 63)))
    q, k, v = problem.q, problem.k, problem.v
    scale = problem.effective_scale
    plan = build_plan(np, q, k, None, "peak", 4, problem.block, scale)
    got = cpu.forward(q, k, v, plan, psa.Recall(0.9), scale, True)
    want = reference.forward(q, k, v, plan, psa.Recall(0.9), scale, True)
    for name, a, b in zip(("out", "lse", "recall_bound"), (got[0], got[1], got[4]),
                          (want[0], want[1], want[4])):
        assert a.dtype == np.float64, name
        np.testing.assert_allclose(a, b, rtol=FLOAT64_STATS_TOLERANCE,
                                   atol=FLOAT64_STATS_TOLERANCE, err_msg=name)
    np.testing.assert_array_equal(got[2], want[2])
    assert got[2].mean() < 1, "no tile skipped: the recall bound was not exercised"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("backend", [cpu, reference], ids=["cpu", "reference"])
def test_out_dtype_float32_writes_the_unrounded_output(dtype, backend):
    """``out_dtype=float32`` returns O before its rounding to a 16-bit input dtype (rounding
    it gives the default output bit for bit), or float64's O rounded once to float32; the
    statistics do not change."""
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((2, 2, 70, 16)).astype(DTYPES[dtype]) for _ in range(3))
    plan = build_plan(np, exact(q), exact(k), None, "peak", 4, (16, 32), 0.25)
    wide = backend.forward(q, k, v, plan, psa.Blasst(0.05), 0.25, True, out_dtype=np.float32)
    narrow = backend.forward(q, k, v, plan, psa.Blasst(0.05), 0.25, True)
    assert wide[0].dtype == np.float32 and narrow[0].dtype == q.dtype
    for a, b in zip(wide[1:], narrow[1:]):
        np.testing.assert_array_equal(a, b)
    if backend is reference:  # float64 arithmetic, rounded once to the requested dtype
        full = reference.forward(q, k, v, plan, psa.Blasst(0.05), 0.25, True,
                                 out_dtype=np.float64)[0]
        np.testing.assert_array_equal(wide[0], full.astype(np.float32))
        np.testing.assert_array_equal(narrow[0], full.astype(q.dtype))
        return
    if dtype == "float64":
        np.testing.assert_array_equal(wide[0], narrow[0].astype(np.float32))
        return
    np.testing.assert_array_equal(wide[0].astype(q.dtype), narrow[0])
    assert (wide[0] != narrow[0].astype(np.float32)).any(), "float32 output was rounded"


# ---------------------------------------------------------------------------------------------
# cpu.matmul: the backend's dense products (SLA's projection and its gradients)

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(5000, 64, 64), (64, 5000, 64), (7, 3, 5), (300, 40, 24),
                                     (1, 1, 1), (0, 4, 8), (5, 0, 8), (9, 12000, 40)])
def test_matmul_equals_the_float64_product(dtype, m, k, n):
    """Both parallel paths (rows of C; slices of a long k, summed in a fixed order), columns
    that are not whole vectors, empty sizes, transposed and Fortran-ordered operands, 1-3
    threads. float32 accumulates in float32: a k-term dot product errs by ~k * 2^-24 relative
    at worst, well inside 1e-5 for these k (random-sign terms grow as sqrt(k))."""
    rng = np.random.default_rng([m, k, n])
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    want = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for threads in (1, 2, 3):
        for left, right in ((a, b), (np.asfortranarray(a), b), (a, np.ascontiguousarray(b.T).T)):
            got = cpu.matmul(left, right, threads=threads)
            assert got.dtype == dtype and got.shape == (m, n) and got.flags.c_contiguous
            if want.size:
                scale = max(1.0, float(np.abs(want).max()))
                assert np.abs(got - want).max() / scale <= tol


def test_matmul_is_bitwise_independent_of_the_thread_count():
    """k in fixed slices summed in order: the backend's results never depend on threads."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((64, 20000)).astype(np.float32)
    b = rng.standard_normal((20000, 40)).astype(np.float32)
    first = cpu.matmul(a, b, threads=1)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(cpu.matmul(a, b, threads=threads), first)


def test_matmul_rejects_bad_input():
    a = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="a must be a NumPy array"):
        cpu.matmul([[1.0]], a)
    with pytest.raises(ValueError, match="b must be 2-D"):
        cpu.matmul(a, np.ones(4, dtype=np.float32))
    with pytest.raises(TypeError, match="b must be float32 or float64"):
        cpu.matmul(a, np.ones((4, 2), dtype=np.float16))
    with pytest.raises(TypeError, match="share a dtype"):
        cpu.matmul(a, np.ones((4, 2), dtype=np.float64))
    with pytest.raises(ValueError, match="a's columns"):
        cpu.matmul(a, np.ones((3, 2), dtype=np.float32))


def test_sla_products_go_through_the_backend_matmul(monkeypatch):
    """The CPU backend's SLA forward with a projection and its vjp use cpu.matmul for every
    dense product (O_l W^T, dW, dO W, the sparse output's O_l W^T), with the results of the
    NumPy products within float32 rounding."""
    rng = np.random.default_rng(4)
    q, k, v, do = (rng.standard_normal((1, 2, 150, 32)).astype(np.float32) for _ in range(4))
    weight = (rng.standard_normal((32, 32)) * 0.1).astype(np.float32)
    bias = (rng.standard_normal(32) * 0.1).astype(np.float32)
    common = dict(critical=0.3, negligible=0.3, block=(32, 32), backend="cpu",
                  proj_weight=weight, proj_bias=bias)
    calls = []
    original = cpu.matmul

    def counting(a, b, threads=None):
        calls.append((a.shape, b.shape))
        return original(a, b, threads=threads)

    out = psa.sla_attention(q, k, v, **common)
    grads = psa.sla_vjp(q, k, v, do, **common)
    monkeypatch.setattr(cpu, "matmul", counting)
    out_hooked = psa.sla_attention(q, k, v, **common)
    forward_calls = len(calls)
    grads_hooked = psa.sla_vjp(q, k, v, do, **common)
    assert forward_calls >= 1 and len(calls) >= forward_calls + 2
    np.testing.assert_array_equal(out_hooked, out)
    for got, want in zip(grads_hooked, grads):
        if want is not None:
            np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(cpu, "matmul", None)  # no hook: the NumPy products
    plain = psa.sla_attention(q, k, v, **common)
    np.testing.assert_allclose(plain, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_backward_and_output_is_the_two_calls(dtype):
    """One pass for the SLA backward: bitwise linear_branch's O_l and linear_backward's
    gradients (GQA, partial tiles, a query tile with no marginal tile, 1-3 threads)."""
    rng = np.random.default_rng(5)
    B, Hq, Hkv, Nq, Nk, D, block = 2, 4, 2, 199, 261, 40, (64, 32)
    q = rng.standard_normal((B, Hq, Nq, D)).astype(dtype)
    k, v = (rng.standard_normal((B, Hkv, Nk, D)).astype(dtype) for _ in range(2))
    marginal = rng.random((B, Hq, 4, 9)) < 0.4
    marginal[0, 0, 0] = False
    g = rng.standard_normal((B, Hq, Nq, D)).astype(dtype)
    for threads in (1, 2, 3):
        grads, o_linear = cpu.linear_backward_and_output(q, k, v, marginal, block, "elu1", 0.1,
                                                         g, threads=threads)
        np.testing.assert_array_equal(
            o_linear, cpu.linear_branch(q, k, v, marginal, block, "elu1", 0.1, threads=threads))
        for got, want in zip(grads, cpu.linear_backward(q, k, v, marginal, block, "elu1", 0.1,
                                                        g, threads=threads)):
            np.testing.assert_array_equal(got, want)


def test_sla_vjp_builds_the_linear_states_once(monkeypatch):
    """With a projection the CPU's sla_vjp takes O_l from its linear backward: no separate
    linear_branch call (which would build the key summaries and H_I a second time)."""
    rng = np.random.default_rng(6)
    q, k, v, do = (rng.standard_normal((1, 2, 150, 32)).astype(np.float32) for _ in range(4))
    weight = (rng.standard_normal((32, 32)) * 0.1).astype(np.float32)
    common = dict(critical=0.3, negligible=0.3, block=(32, 32), backend="cpu",
                  proj_weight=weight)
    want = psa.sla_vjp(q, k, v, do, **common)

    def no_forward(*args, **kwargs):
        raise AssertionError("linear_branch ran although the backward gives O_l")

    monkeypatch.setattr(cpu, "linear_branch", no_forward)
    for got, expected in zip(psa.sla_vjp(q, k, v, do, **common), want):
        np.testing.assert_array_equal(got, expected)
