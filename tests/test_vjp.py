"""Gradients: ``attention_vjp`` and ``sla_vjp`` against central finite differences (float64).

The function differentiated is the one the forward computed: its plan and kept set are held
fixed (docs/design.rst section 7). Each check compares the vjp with a central difference along a
fresh random direction per argument, which tests every entry of the gradient at once.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import pysparse_attn as psa
from strategies import ORDERS, make_rule, problems, skip_rules_params

STEP = 1e-5
# Central differences in float64: truncation ~ STEP**2 * |f'''| ~ 1e-10, relative to the size
# of the directional derivative; rounding is the floor below.
FD_RTOL = 1e-6


small_problems = problems(max_n=70, max_dim=12)


def directional_check(output, cotangent, point, gradients, rng, label):
    """Compare ``<gradient, direction>`` with the central difference of
    ``f(point) = sum(cotangent * output(**point))`` along a random direction per argument."""
    for name, gradient in gradients.items():
        direction = rng.standard_normal(point[name].shape)
        terms_plus = cotangent * output(**dict(point, **{name: point[name] + STEP * direction}))
        terms_minus = cotangent * output(**dict(point, **{name: point[name] - STEP * direction}))
        numeric = (terms_plus.sum() - terms_minus.sum()) / (2 * STEP)
        analytic = float(np.sum(gradient * direction))
        size = np.linalg.norm(gradient) * np.linalg.norm(direction) + abs(numeric)
        # Rounding floor: each of f's terms carries ~1e-16 relative error, so the difference
        # quotient carries ~1e-16 * sum|terms| / STEP. It decides only where the derivative is
        # itself tiny (a single key: the output ignores q; eps-dominated linear branches).
        floor = 100 * np.finfo(np.float64).eps * np.abs(terms_plus).sum() / STEP
        assert abs(analytic - numeric) <= FD_RTOL * size + floor, (
            f"{label} d{name}: vjp gives {analytic:.10e}, finite differences {numeric:.10e}")


@given(small_problems, st.sampled_from([None, "mask", "topk"]))
def test_attention_vjp_matches_finite_differences(problem, selector):
    nq, nk = problem.n_tiles
    rng = problem.rng(1)
    select = {
        None: None,
        "mask": psa.BlockMask((rng.random((nq, nk)) < 0.5) | (np.arange(nk) == nk - 1)),
        "topk": psa.TopK(k=2),
    }[selector]
    do = rng.standard_normal(problem.q.shape)
    common = dict(block=problem.block, scale=problem.scale, backend="reference")
    _, stats = psa.attention(problem.q, problem.k, problem.v, select=select, return_stats=True,
                             **common)
    dq, dk, dv = psa.attention_vjp(problem.q, problem.k, problem.v, do, select=select, **common)
    assert dq.shape == problem.q.shape and dk.shape == problem.k.shape
    assert dv.shape == problem.v.shape and dq.dtype == np.float64
    fixed = psa.BlockMask(stats.kept)  # the plan of the forward, held fixed

    def output(q, k, v):
        return psa.attention(q, k, v, select=fixed, **common)

    directional_check(output, do, dict(q=problem.q, k=problem.k, v=problem.v),
                      dict(q=dq, k=dk, v=dv), problem.rng(2), "attention")


@given(problems(max_n=70, max_dim=12, sharp=True), skip_rules_params, st.sampled_from(ORDERS))
def test_attention_vjp_holds_the_forward_kept_set_fixed(problem, rule_params, order):
    rule = make_rule(*rule_params)
    common = dict(block=problem.block, scale=problem.scale, backend="reference")
    do = problem.rng(3).standard_normal(problem.q.shape)
    _, stats = psa.attention(problem.q, problem.k, problem.v, skip=rule, order=order,
                             return_stats=True, **common)
    replayed = psa.attention_vjp(problem.q, problem.k, problem.v, do, kept=stats.kept, **common)
    recomputed = psa.attention_vjp(problem.q, problem.k, problem.v, do, skip=rule, order=order,
                                   **common)
    for a, b in zip(replayed, recomputed):
        np.testing.assert_array_equal(a, b)
    fixed = psa.BlockMask(stats.kept)

    def output(q, k, v):
        return psa.attention(q, k, v, select=fixed, **common)

    directional_check(output, do, dict(q=problem.q, k=problem.k, v=problem.v),
                      dict(q=replayed[0], k=replayed[1], v=replayed[2]), problem.rng(4),
                      "attention with a skip rule")


@given(small_problems, st.tuples(st.floats(0.05, 1.0), st.floats(0.0, 0.9)),
       st.sampled_from(["marginal", "complement", "global"]),
       st.sampled_from(["softmax", "elu1", "relu"]), st.booleans(), st.booleans())
def test_sla_vjp_matches_finite_differences(problem, split, linear, feature_map, trained,
                                            with_bias):
    critical, negligible = split
    D = problem.q.shape[-1]
    rng = problem.rng(5)
    q, k, v = problem.q, problem.k, problem.v
    if feature_map == "relu":
        # relu has a kink at 0: a central difference whose step straddles it measures neither
        # one-sided derivative, so inputs keep a distance of 100 steps from it.
        q, k = (np.where(np.abs(x) < 100 * STEP, np.copysign(100 * STEP, x), x) for x in (q, k))
    weight = rng.standard_normal((D, D)) if trained else None
    bias = rng.standard_normal(D) if with_bias else None
    # relu can zero a denominator, where the branch is not differentiable; eps keeps it smooth.
    eps = 0.5 if feature_map == "relu" else None
    options = dict(critical=critical, negligible=negligible, linear=linear,
                   feature_map=feature_map, eps=eps, block=problem.block, scale=problem.scale,
                   backend="reference")
    do = rng.standard_normal(q.shape)
    _, stats = psa.sla_attention(q, k, v, proj_weight=weight,
                                 proj_bias=bias, return_stats=True, **options)
    dq, dk, dv, dw, db = psa.sla_vjp(q, k, v, do, proj_weight=weight,
                                     proj_bias=bias, **options)
    assert dw.shape == (D, D) and db.shape == (D,)
    np.testing.assert_allclose(db, do.sum(axis=(0, 1, 2)), rtol=1e-12, atol=1e-12)
    point = dict(q=q, k=k, v=v,
                 w=np.zeros((D, D)) if weight is None else weight,
                 b=np.zeros(D) if bias is None else bias)

    def output(q, k, v, w, b):
        out, perturbed = psa.sla_attention(q, k, v, proj_weight=w, proj_bias=b,
                                           return_stats=True, **options)
        # The vjp is of the function with this plan; a step that changes the plan (a score
        # tie within 1e-5) measures a different function.
        assume((perturbed.kept == stats.kept).all()
               and (perturbed.marginal == stats.marginal).all())
        return out

    directional_check(output, do, point, dict(q=dq, k=dk, v=dv, w=dw, b=db), problem.rng(6),
                      f"sla ({linear}, {feature_map})")


# ---------------------------------------------------------------------------------------------
# Saved tensors (out, lse from the forward) and deterministic mode


def _cpu_or_skip():
    from pysparse_attn import backends

    try:
        backends.load("cpu")
    except ValueError as error:
        pytest.skip(f"cpu backend not available: {error}")


def _saved_problem(dtype, layout, seed, Hq=4, Hkv=2, Nq=75, Nk=90, D=16):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, Hq, Nq, D))
    k, v = (rng.standard_normal((1, Hkv, Nk, D)) for _ in range(2))
    do = rng.standard_normal(q.shape)
    if layout == "bnhd":
        q, k, v, do = (np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in (q, k, v, do))
    return tuple(x.astype(dtype) for x in (q, k, v, do))


# float32 on cpu: the saved O and LSE come from the forward's own float32 loop, which visits
# the kept tiles in the plan's order while the backward's recomputation visits them in
# ascending order; the two differ by a few float32 roundings per row (~1e-6 relative),
# amplified at most by the few tile products that follow.
# bfloat16: the saved O is the forward's output rounded to bfloat16 (2^-9 relative), so Delta
# moves by about that much relative to |dO| |O|.
SAVED_RTOL = {"float64": 1e-11, "float32": 2e-5, "bfloat16": 1e-2}


@pytest.mark.parametrize("backend, dtype", [("cpu", "float64"), ("cpu", "float32"),
                                            ("cpu", "bfloat16"), ("reference", "float64"),
                                            ("reference", "float32")])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("given", ["out+lse", "out", "lse"])
def test_attention_vjp_with_saved_tensors_equals_the_recomputed_one(backend, layout, dtype,
                                                                    given):
    if backend == "cpu":
        _cpu_or_skip()
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    q, k, v, do = _saved_problem(dtype, layout, seed=[31, len(given)])
    common = dict(block=(16, 32), select=psa.TopK(k=2), skip=psa.Recall(0.9),
                  layout=layout, backend=backend)
    out, stats = psa.attention(q, k, v, return_stats=True, **common)
    saved = {"out": out, "lse": stats.lse}
    given_tensors = {name: saved[name] for name in given.split("+")}
    recomputed = psa.attention_vjp(q, k, v, do, kept=stats.kept, **common)
    replayed = psa.attention_vjp(q, k, v, do, kept=stats.kept, **given_tensors, **common)
    for name, a, b in zip(("dq", "dk", "dv"), replayed, recomputed):
        assert a.dtype == b.dtype == q.dtype and a.shape == b.shape, name
        if backend == "reference":  # the oracle ignores saved tensors: bit for bit
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            scale = np.abs(b.astype(np.float64)).max()
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=0,
                                       atol=SAVED_RTOL[np.dtype(dtype).name] * scale,
                                       err_msg=f"{name} with {given} given")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_backward_uses_the_saved_lse_and_output(dtype):
    """A saved LSE shifted by c scales P, hence dV, by exp(-c) exactly: proof that the kernel
    reads it rather than recomputing it. A saved output changes Delta, hence dq and dk, but
    never dv (which does not involve Delta)."""
    _cpu_or_skip()
    from pysparse_attn.backends import cpu

    q, k, v, do = _saved_problem(dtype, "bhnd", seed=32)
    block, scale = (16, 32), 0.25
    kept = np.ones((1, 4, 5, 3), dtype=bool)
    kept[..., 1] = False
    acc = np.dtype(dtype)
    _, lse, _, _, _ = cpu.forward(q, k, v, psa.Plan.from_kept(kept, block=block), None, scale,
                                  False)
    base = cpu.attention_backward(q, k, v, do, kept, block, scale, lse=lse)
    shifted = cpu.attention_backward(q, k, v, do, kept, block, scale, lse=lse + acc.type(0.5))
    # dv sums terms of both signs: the tolerance is relative to its largest entry.
    tolerance = (1e-5 if dtype == "float32" else 1e-12) * np.abs(base[2]).max()
    np.testing.assert_allclose(shifted[2], base[2] * np.exp(-0.5), rtol=0, atol=tolerance)
    zero_out = cpu.attention_backward(q, k, v, do, kept, block, scale, lse=lse,
                                      out=np.zeros_like(q))
    np.testing.assert_array_equal(zero_out[2], base[2])
    assert not np.allclose(zero_out[0], base[0]), "a zero output (Delta = 0) must change dq"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_attention_vjp_without_kept_hands_the_forward_to_the_backward(backend, monkeypatch):
    """Without kept the forward runs once, and its out and lse reach the backend."""
    if backend == "cpu":
        _cpu_or_skip()
    from pysparse_attn import backends

    module = backends.load(backend)
    q, k, v, do = _saved_problem("float64", "bhnd", seed=33)
    seen = {}
    original = module.attention_backward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "attention_backward", spy)
    psa.attention_vjp(q, k, v, do, block=(16, 16), select=psa.TopK(k=2), backend=backend)
    assert seen["out"] is not None and seen["lse"] is not None
    assert seen["out"].shape == q.shape and seen["lse"].shape == q.shape[:3]
    assert seen["deterministic"] is False and seen["grad_dtype"] == np.float64


@pytest.mark.parametrize("linear", ["marginal", "complement", "global"])
@pytest.mark.parametrize("projection", ["none", "bias", "weight+bias"])
@pytest.mark.parametrize("backend, dtype", [("cpu", "float32"), ("cpu", "float64"),
                                            ("reference", "float64")])
def test_sla_vjp_with_saved_tensors_equals_the_recomputed_one(linear, projection, backend,
                                                              dtype):
    if backend == "cpu":
        _cpu_or_skip()
    q, k, v, do = _saved_problem(dtype, "bnhd", seed=[34, len(linear), len(projection)])
    D = q.shape[-1]
    rng = np.random.default_rng(35)
    weight = rng.standard_normal((D, D)) / 4 if "weight" in projection else None
    bias = rng.standard_normal(D) if "bias" in projection else None
    common = dict(critical=0.4, negligible=0.2, linear=linear, block=(16, 32),
                  proj_weight=weight, proj_bias=bias, layout="bnhd", backend=backend,
                  skip=psa.Blasst(1e-2))
    out, stats = psa.sla_attention(q, k, v, return_stats=True, **common)
    recomputed = psa.sla_vjp(q, k, v, do, kept=stats.kept, **common)
    replayed = psa.sla_vjp(q, k, v, do, kept=stats.kept, out=out, lse=stats.lse, **common)
    rtol = SAVED_RTOL[dtype] * (10 if dtype == "float32" else 1)  # O_s = out - Y: one more GEMM
    for name, a, b in zip(("dq", "dk", "dv", "dW", "db"), replayed, recomputed):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if backend == "reference" or name in ("dW", "db"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max(),
                                       err_msg=f"{name} ({linear}, {projection})")


def test_sla_vjp_derives_the_sparse_output_from_the_merged_one(monkeypatch):
    """The sparse backward receives O_s = out - (O_l W^T + b), equal to the sparse forward's
    output, and no sparse forward runs."""
    from pysparse_attn.backends import reference

    q, k, v, do = _saved_problem("float64", "bhnd", seed=36)
    D = q.shape[-1]
    rng = np.random.default_rng(37)
    common = dict(critical=0.4, negligible=0.2, block=(16, 32), backend="reference",
                  proj_weight=rng.standard_normal((D, D)), proj_bias=rng.standard_normal(D))
    out, stats = psa.sla_attention(q, k, v, return_stats=True, **common)
    sparse_out = psa.attention(q, k, v, select=psa.BlockMask(stats.kept), block=(16, 32),
                               backend="reference")
    seen = {}
    original = reference.attention_backward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    def no_forward(*args, **kwargs):
        raise AssertionError("sla_vjp ran the sparse forward although kept, out, lse were given")

    monkeypatch.setattr(reference, "attention_backward", spy)
    monkeypatch.setattr(reference, "forward", no_forward)
    psa.sla_vjp(q, k, v, do, kept=stats.kept, out=out, lse=stats.lse, **common)
    np.testing.assert_allclose(seen["out"], sparse_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(seen["lse"], stats.lse)


@pytest.mark.parametrize("vjp", ["attention", "sla"])
def test_deterministic_gradients_are_bitwise_stable(vjp):
    """deterministic=True is accepted; the cpu backend is bitwise reproducible across runs and
    thread counts with or without it (each output row has one writer)."""
    _cpu_or_skip()
    q, k, v, do = _saved_problem("float32", "bhnd", seed=38)
    common = dict(block=(16, 16), backend="cpu")
    if vjp == "attention":
        function, common = psa.attention_vjp, dict(common, select=psa.TopK(k=3))
    else:
        function, common = psa.sla_vjp, dict(
            common, critical=0.3, negligible=0.2,
            proj_weight=np.random.default_rng(39).standard_normal((16, 16)))
    runs = [function(q, k, v, do, threads=threads, deterministic=deterministic, **common)
            for threads, deterministic in ((1, True), (3, True), (3, False), (2, True))]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("linear", ["marginal", "complement"])
@pytest.mark.parametrize("backend, dtype", [("cpu", "float32"), ("reference", "float64")])
def test_sla_vjp_given_kept_and_marginal_builds_no_plan(linear, backend, dtype, monkeypatch):
    """The forward's kept and marginal tiles describe it: with them sla_vjp equals the call
    that rebuilds the plan, bitwise, and builds none."""
    from pysparse_attn import _api

    if backend == "cpu":
        _cpu_or_skip()
    q, k, v, do = _saved_problem(dtype, "bhnd", seed=[38, len(linear)])
    D = q.shape[-1]
    rng = np.random.default_rng(39)
    common = dict(critical=0.4, negligible=0.2, linear=linear, block=(16, 32),
                  proj_weight=rng.standard_normal((D, D)) / 4, proj_bias=rng.standard_normal(D),
                  backend=backend)
    out, stats = psa.sla_attention(q, k, v, return_stats=True, **common)
    saved = dict(kept=stats.kept, out=out, lse=stats.lse)
    planned = psa.sla_vjp(q, k, v, do, **saved, **common)

    def no_plan(*args, **kwargs):
        raise AssertionError("sla_vjp built a plan although kept and marginal were given")

    monkeypatch.setattr(_api, "_plan", no_plan)
    given = psa.sla_vjp(q, k, v, do, marginal=stats.marginal, **saved, **common)
    for name, a, b in zip(("dq", "dk", "dv", "dW", "db"), given, planned):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_sla_vjp_marginal_needs_kept_and_no_plan():
    q, k, v, do = _saved_problem("float64", "bhnd", seed=40)
    common = dict(critical=0.4, negligible=0.2, block=(16, 32), backend="reference")
    _, stats = psa.sla_attention(q, k, v, return_stats=True, **common)
    with pytest.raises(ValueError, match="marginal"):
        psa.sla_vjp(q, k, v, do, marginal=stats.marginal, **common)
    with pytest.raises(ValueError, match="marginal"):
        psa.sla_vjp(q, k, v, do, marginal=stats.marginal, kept=stats.kept, plan=stats.plan,
                    block=(16, 32), backend="reference")
    with pytest.raises(ValueError, match="marginal"):
        assert stats.marginal.shape[-1] > 2
        psa.sla_vjp(q, k, v, do, marginal=stats.marginal[..., :-1], kept=stats.kept,
                    **common)
    with pytest.raises(TypeError, match="marginal"):
        psa.sla_vjp(q, k, v, do, marginal=stats.marginal.astype(np.int8), kept=stats.kept,
                    **common)
