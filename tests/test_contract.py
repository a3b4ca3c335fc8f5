"""One backend contract (docs/design.rst section 8) for ``reference``, ``cpu`` and ``cupy``.

Every case goes through :func:`contract.check_forward`: output and LSE vs exact attention on
the backend's own kept set, every decision vs the rule within a margin, and the structural
promises of a forward. Host backends draw random problems (odd sizes, GQA, cross-attention,
tiles of 8 to 32, every dtype and layout); the GPU runs a fixed grid over the shapes, tiles,
head dims and kernels it supports. GPU cases are marked ``gpu`` and skip, with the reason,
without CuPy or a device.
"""

from __future__ import annotations

import numpy as np
import pytest
from contract import BACKENDS, backend_params, check_forward
from hypothesis import given
from hypothesis import strategies as st
from strategies import RULE_THRESHOLDS, make_rule, problems, random_tile_mask

import pysparse_attn as psa

HOST = backend_params(("reference", "cpu"))
GPU = backend_params(("cupy",))
ORDERS = ["natural", "score", "peak"]


@st.composite
def rules(draw, heads):
    """None, or a rule whose parameter is a scalar or one value per query head."""
    name = draw(st.sampled_from([None] + list(RULE_THRESHOLDS)))
    if name is None:
        return None
    if draw(st.booleans()):
        return make_rule(name, draw(RULE_THRESHOLDS[name]))
    values = np.array([draw(RULE_THRESHOLDS[name]) for _ in range(heads)])
    return make_rule(name, values)


def selector(kind, problem):
    nq, nk = problem.n_tiles
    if kind is None:
        return None
    if kind == "topk":
        return psa.TopK(k=max(1, nk // 2))
    if kind == "topp":
        return psa.TopP(0.8)
    B, H = problem.q.shape[:2]
    return psa.BlockMask(random_tile_mask(problem.rng(1), (B, H, nq, nk), 0.5))


@pytest.mark.parametrize("backend", HOST)
@given(problem=problems(sharp=True), data=st.data(),
       layout=st.sampled_from(["bhnd", "bnhd", "strided"]), order=st.sampled_from(ORDERS),
       kind=st.sampled_from([None, None, "topk", "topp", "mask"]))
def test_host_forward_meets_the_contract(backend, problem, data, layout, order, kind):
    dtype = data.draw(st.sampled_from(backend.dtypes), label="dtype")
    rule = data.draw(rules(problem.q.shape[1]), label="rule")
    check_forward(backend, problem.q, problem.k, problem.v, dtype=dtype, block=problem.block,
                  rule=rule, select=selector(kind, problem), order=order,
                  scale=problem.effective_scale, layout=layout)


# ---------------------------------------------------------------------------------------------
# GPU: the shapes, tiles and kernels it supports


GPU_RULES = {
    "none": None,
    "blasst": psa.Blasst(1e-2),
    "cef": psa.Cef(-5.0),
    "recall": psa.Recall(0.9),
    "recall_exact": psa.Recall(0.9, exact=True),
    "per-head": psa.Recall(np.array([0.6, 0.9, 0.99, 1.0])),
}


def _kernel_params():
    """Every forward family where the device runs it (wgmma, sm90_ws: Hopper only)."""
    reason = BACKENDS["cupy"].unavailable_reason()
    params = []
    for name in ("wgmma", "sm90_ws", "mma_sync"):
        why = reason
        if why is None:
            from pysparse_attn.backends import cupy as backend

            why = backend.kernel_unavailable_reason(name)
        params.append(pytest.param(name, marks=pytest.mark.skipif(why is not None,
                                                                  reason=str(why))))
    return params


def clustered(rng, B, H, Hkv, Nq, Nk, D, strength=1.0):
    """Tokens around shared centres, one centre per run of 64 tokens (tile-coherent, as in
    video latents): attention concentrates on some key tiles, so skip rules have work."""
    centres = rng.standard_normal((4, D))

    def tokens(heads, n):
        runs = rng.integers(0, len(centres), size=(B, heads, -(-n // 64)))
        labels = np.repeat(runs, 64, axis=-1)[..., :n]
        return strength * centres[labels] + rng.standard_normal((B, heads, n, D))

    return tokens(H, Nq), tokens(Hkv, Nk), rng.standard_normal((B, Hkv, Nk, D))


def fresh_rng():
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("rule_name", list(GPU_RULES))
@pytest.mark.parametrize("kernel", _kernel_params())
def test_gpu_forward_meets_the_contract(backend, dtype, D, block, layout, rule_name, kernel):
    rule = GPU_RULES[rule_name]
    q, k, v = clustered(fresh_rng(), 2, 4, 2, 197, 251, D)
    check_forward(backend, q, k, v, dtype=dtype, block=block, rule=rule,
                  order="natural" if rule is None else "peak", peak=4, layout=layout,
                  options={"kernel": kernel})


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("select", [psa.TopK(ratio=0.4), psa.TopK(k=1), psa.TopP(0.8)],
                         ids=["topk-ratio", "topk-1", "topp"])
@pytest.mark.parametrize("rule_name", ["none", "blasst", "recall", "per-head"])
@pytest.mark.parametrize("order", ORDERS)
def test_gpu_plans_with_selectors_and_orders(backend, select, rule_name, order):
    q, k, v = clustered(fresh_rng(), 2, 4, 2, 197, 251, 64)
    check_forward(backend, q, k, v, dtype="bfloat16", block=(64, 64), rule=GPU_RULES[rule_name],
                  select=select, order=order, peak=4)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("Nq,Nk,Hq,Hkv", [(64, 64, 2, 2), (1, 300, 3, 1), (300, 1, 2, 1),
                                          (129, 1000, 6, 2), (500, 77, 1, 1)])
@pytest.mark.parametrize("kernel", _kernel_params())
def test_gpu_odd_sizes_cross_attention_and_gqa(backend, Nq, Nk, Hq, Hkv, kernel):
    rng = fresh_rng()
    for block in [(64, 64), (128, 64)]:
        q, k, v = clustered(rng, 1, Hq, Hkv, Nq, Nk, 128)
        check_forward(backend, q, k, v, dtype="float16", block=block, rule=psa.Recall(0.9),
                      order="peak", peak=4, options={"kernel": kernel})


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
@pytest.mark.parametrize("rule_name", ["none", "blasst", "recall"])
@pytest.mark.parametrize("order", ["natural", "peak"])
@pytest.mark.parametrize("kernel", _kernel_params())
def test_gpu_long_key_lists_cycle_the_whole_pipeline(backend, D, block, rule_name, order,
                                                     kernel):
    """47 key tiles: every stage of the shared-memory ring is reused many times, in plan
    orders that jump around; fp16 keeps the tolerance tight enough to see one wrong tile."""
    q, k, v = clustered(fresh_rng(), 1, 2, 1, 1000, 3000, D, strength=2.0)
    check_forward(backend, q, k, v, dtype="float16", block=block, rule=GPU_RULES[rule_name],
                  order=order, peak=4, options={"kernel": kernel})
