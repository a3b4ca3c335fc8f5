"""Gradients: ``attention_vjp`` and ``sla_vjp`` against central finite differences (float64).

The function differentiated is the one the forward computed: its plan and kept set are held
fixed (DESIGN.md section 7). Each check compares the vjp with a central difference along a
fresh random direction per argument, which tests every entry of the gradient at once.
"""

from __future__ import annotations

import numpy as np
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
