"""The CUDA backend (``backends/cupy.py`` + ``gpu/*.cu``) against the float64 reference.

Every GPU test is marked ``gpu`` and skipped, with the reason, without CuPy or a CUDA device.
The oracle for an output is exact attention on the kept set the kernel reports
(``_reference.masked_attention``); each skip decision is checked against the rule with a small
margin (``_reference.decision_slack``), since fp32 and float64 may decide differently only
within rounding of the threshold. One non-GPU test compiles every kernel instance when nvcc is
on the PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from pysparse_attn import _reference
from pysparse_attn._plan import tile_count
from pysparse_attn._rules import Blasst, Cef, Recall, rule_code
from pysparse_attn._select import TopK, TopP


def _gpu_skip_reason():
    try:
        from pysparse_attn.backends import cupy as backend
    except Exception as error:  # the module imports no CuPy at import time; be safe anyway
        return f"cupy backend not importable: {error}"
    return backend.unavailable_reason()


_REASON = _gpu_skip_reason()
gpu = pytest.mark.skipif(_REASON is not None, reason=f"GPU tests need CuPy and a CUDA device "
                         f"of compute capability >= 8.0: {_REASON}")


def _kernel_skip_reason(kernel):
    if _REASON is not None:
        return _REASON
    from pysparse_attn.backends import cupy as backend

    return backend.kernel_unavailable_reason(kernel)


# Both forward families on every case where the device runs them (wgmma: Hopper only).
KERNEL_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(_kernel_skip_reason(name) is not None,
                                                reason=str(_kernel_skip_reason(name))))
    for name in ("wgmma", "mma_sync")
]

# Relative L2 error of the output vs float64 attention on the same (rounded) inputs and kept
# set. The inputs are exact; the error comes from P rounded to the 16-bit type before P.V
# (bf16: 8 significant bits, ~4e-3 per element; fp16: 11 bits, ~5e-4) and fp32 accumulation.
OUT_TOLERANCE = {"bfloat16": 1.5e-2, "float16": 3e-3}
# LSE is computed in fp32 from exact logits: only accumulation and exp2 rounding remain.
LSE_TOLERANCE = 2e-3
# Margin, in natural-log units, within which fp32 and float64 may decide a skip differently.
DECISION_MARGIN = 2e-3

RULES = {
    "none": None,
    "blasst": Blasst(1e-2),
    "cef": Cef(-5.0),
    "recall": Recall(0.9),
    "recall_exact": Recall(0.9, exact=True),
}


def _fresh_rng():
    """A generator on a fresh seed, printed so that a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _clustered(rng, centres, B, H, N, D, strength):
    """Tokens around shared centres, one centre per run of 64 tokens (tile-coherent, as in
    video latents): attention concentrates on some key tiles, so skip rules have work."""
    n_clusters = len(centres)
    runs = rng.integers(0, n_clusters, size=(B, H, -(-N // 64)))
    labels = np.repeat(runs, 64, axis=-1)[..., :N]
    return (strength * centres[labels] + rng.standard_normal((B, H, N, D))).astype(np.float32)


def _dtype(name):
    """A dtype CuPy accepts for ``name`` (bfloat16 is ml_dtypes' type)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _inputs(rng, dtype, B, Hq, Hkv, Nq, Nk, D, layout, strength=1.0):
    """Random GPU inputs in ``dtype`` plus their exact float64 values on the host."""
    import cupy

    dtype = _dtype(dtype)
    centres = rng.standard_normal((4, D))
    host = [_clustered(rng, centres, B, Hq, Nq, D, strength),
            _clustered(rng, centres, B, Hkv, Nk, D, strength),
            rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32)]
    device, exact = [], []
    for x in host:
        if layout == "bnhd":
            # flash-attn layout: a (B, N, H, D) buffer seen through a transposed view.
            buffer = cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).astype(dtype)
            y = buffer.transpose(0, 2, 1, 3)
        else:
            y = cupy.asarray(x).astype(dtype)
        device.append(y)
        exact.append(cupy.asnumpy(y.astype(cupy.float32)).astype(np.float64))
    return device, exact


def _host_plan(plan):
    return plan.to("host")


def _poison_pool(shape):
    """Leave NaN in the pool block that the next 16-bit allocation of ``shape`` reuses.

    0xFFFF is a NaN in both float16 and bfloat16; CuPy's pool hands a freed block of the same
    size to the next allocation, which is the backend's output buffer.
    """
    import cupy

    poison = cupy.full(shape, 0xFFFF, dtype=cupy.uint16)
    del poison


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run_and_check(rng, *, dtype, D, block, layout, rule_name, selector, Nq=197, Nk=251,
                   B=2, Hq=4, Hkv=2, order=None, strength=1.0, kernel=None):
    import cupy

    from pysparse_attn.backends import cupy as backend

    (q, k, v), (q64, k64, v64) = _inputs(rng, dtype, B, Hq, Hkv, Nq, Nk, D, layout, strength)
    skip = RULES[rule_name]
    code, param = rule_code(skip)
    scale = D ** -0.5
    order = order or ("peak" if skip is not None else "natural")
    plan = backend.build_plan(cupy, q, k, selector, order, 4, block, scale)
    _poison_pool((B, Hq, Nq, D))
    out, lse, kept, visited, bound = backend.forward(q, k, v, plan, code, param, scale, True,
                                                     kernel=kernel)
    cupy.cuda.runtime.deviceSynchronize()
    out_h = cupy.asnumpy(out.astype(cupy.float32)).astype(np.float64)
    lse_h, kept_h, visited_h, bound_h = (cupy.asnumpy(x) for x in (lse, kept, visited, bound))
    host_plan = _host_plan(plan)

    assert out.dtype == q.dtype and out.shape == (B, Hq, Nq, D)
    assert np.isfinite(out_h).all(), "unwritten (poisoned) or non-finite output"
    assert np.isfinite(lse_h).all() and np.isfinite(bound_h).all()

    # Visited = exactly the plan's lists; kept within visited; the first of each list kept.
    nq, nk = host_plan.nq, host_plan.nk
    listed = np.zeros((B, Hq, nq, nk), dtype=bool)
    for index in np.ndindex(B, Hq, nq):
        entries = host_plan.visit[index][: host_plan.count[index]]
        listed[index][entries] = True
        assert kept_h[index][entries[0]], f"first visited tile skipped at {index}"
    np.testing.assert_array_equal(visited_h, listed)
    assert not (kept_h & ~visited_h).any()

    # Output and LSE against exact attention on the reported kept set.
    ref_out, ref_lse = _reference.masked_attention(q64, k64, v64, kept_h, block, scale)
    error = _rel_l2(out_h, ref_out)
    assert error <= OUT_TOLERANCE[dtype], f"relative L2 error {error:.3g}"
    assert np.max(np.abs(lse_h - ref_lse)) <= LSE_TOLERANCE

    # Each decision follows the rule within the margin.
    slack = _reference.decision_slack(q64, k64, v64, host_plan, kept_h, code, param, scale)
    decided = ~np.isnan(slack)
    skipped = decided & ~kept_h
    kept_decided = decided & kept_h
    assert (slack[skipped] >= -DECISION_MARGIN).all(), "skipped a tile the rule keeps"
    assert (slack[kept_decided] <= DECISION_MARGIN).all(), "kept a tile the rule skips"
    if skip is None:
        assert not skipped.any()
        np.testing.assert_array_equal(bound_h, 1.0)
    return dict(kept=kept_h, visited=visited_h, bound=bound_h, q64=q64, k64=k64, plan=host_plan,
                skipped=int(skipped.sum()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_forward_matches_reference_on_its_kept_set(dtype, D, block, layout, rule_name, kernel):
    rng = _fresh_rng()
    _run_and_check(rng, dtype=dtype, D=D, block=block, layout=layout, rule_name=rule_name,
                   selector=None, kernel=kernel)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("selector", [TopK(ratio=0.4), TopK(k=1), TopP(0.8)],
                         ids=["topk-ratio", "topk-1", "topp"])
@pytest.mark.parametrize("rule_name", ["none", "blasst", "recall"])
@pytest.mark.parametrize("order", ["natural", "score", "peak"])
def test_plans_with_selectors_and_orders(selector, rule_name, order):
    rng = _fresh_rng()
    _run_and_check(rng, dtype="bfloat16", D=64, block=(64, 64), layout="bhnd",
                   rule_name=rule_name, selector=selector, order=order)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("Nq,Nk,Hq,Hkv", [(64, 64, 2, 2), (1, 300, 3, 1), (300, 1, 2, 1),
                                          (129, 1000, 6, 2), (500, 77, 1, 1)])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_odd_sizes_cross_attention_and_gqa(Nq, Nk, Hq, Hkv, kernel):
    rng = _fresh_rng()
    for block in [(64, 64), (128, 64)]:
        _run_and_check(rng, dtype="float16", D=128, block=block, layout="bhnd",
                       rule_name="recall", selector=None, Nq=Nq, Nk=Nk, B=1, Hq=Hq, Hkv=Hkv,
                       kernel=kernel)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
@pytest.mark.parametrize("rule_name", ["none", "blasst", "recall"])
@pytest.mark.parametrize("order", ["natural", "peak"])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_long_key_lists_cycle_the_whole_pipeline(D, block, rule_name, order, kernel):
    """47 key tiles: every stage of the shared-memory ring is reused many times, in plan
    orders that jump around; fp16 keeps the tolerance tight enough to see one wrong tile."""
    rng = _fresh_rng()
    _run_and_check(rng, dtype="float16", D=D, block=block, layout="bhnd", rule_name=rule_name,
                   selector=None, Nq=1000, Nk=3000, B=1, Hq=2, Hkv=1, order=order,
                   strength=2.0, kernel=kernel)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 0.99])
@pytest.mark.parametrize("exact", [False, True])
def test_recall_guarantee_on_gpu_kept_set(target, exact):
    """With no selector, every row keeps at least `target` of its softmax mass (exact oracle)."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v), (q64, k64, _) = _inputs(rng, "bfloat16", 1, 4, 4, 300, 1500, 64, "bhnd", 1.5)
    code, param = rule_code(Recall(target, exact=exact))
    scale = 64 ** -0.5
    plan = backend.build_plan(cupy, q, k, None, "peak", 4, (64, 64), scale)
    _, _, kept, _, bound = backend.forward(q, k, v, plan, code, param, scale, True)
    kept_h, bound_h = cupy.asnumpy(kept), cupy.asnumpy(bound)
    true_recall = _reference.recall_of_kept(q64, k64, kept_h, (64, 64), scale)
    # fp32 bookkeeping of a bound that is tight at the threshold: allow float32 rounding only.
    assert (bound_h >= target * (1 - 1e-5)).all()
    assert (true_recall >= target * (1 - 1e-4)).all()
    # The bound is conservative: never above the true recall (up to rounding).
    assert (bound_h <= true_recall + 1e-4).all()
    # The workload is concentrated enough that the rule skips something below 0.99.
    if target <= 0.95:
        assert not kept_h.all()


@pytest.mark.gpu
@gpu
def test_unaligned_strides_are_copied_not_misread():
    """A view whose rows are not 16-byte aligned is copied; the caller's array is untouched."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    wide = cupy.asarray(rng.standard_normal((1, 2, 150, 68)).astype(np.float32)).astype(
        cupy.float16)
    q = wide[..., 1:65]  # unit stride along D, rows start at odd element offsets
    k = cupy.asarray(rng.standard_normal((1, 2, 150, 64)).astype(np.float16))
    v = cupy.asarray(rng.standard_normal((1, 2, 150, 64)).astype(np.float16))
    before = wide.copy()
    plan = backend.build_plan(cupy, q, k, None, "natural", 4, (64, 64), 0.125)
    out, _, kept, _, _ = backend.forward(q, k, v, plan, 0, 0.0, 0.125, True)
    ref, _ = _reference.masked_attention(*(cupy.asnumpy(x.astype(cupy.float32)).astype(float)
                                           for x in (q, k, v)), cupy.asnumpy(kept), (64, 64),
                                         0.125)
    assert _rel_l2(cupy.asnumpy(out.astype(cupy.float32)), ref) <= OUT_TOLERANCE["float16"]
    assert bool((wide == before).all())


@pytest.mark.gpu
@gpu
def test_float32_inputs_are_accepted_at_bfloat16_precision():
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    q, k, v = (cupy.asarray(rng.standard_normal((1, 2, 130, 64)).astype(np.float32))
               for _ in range(3))
    plan = backend.build_plan(cupy, q, k, None, "natural", 4, (64, 64), 0.125)
    out, _, kept, _, _ = backend.forward(q, k, v, plan, 0, 0.0, 0.125, True)
    assert out.dtype == cupy.float32
    ref, _ = _reference.masked_attention(*(cupy.asnumpy(x).astype(float) for x in (q, k, v)),
                                         cupy.asnumpy(kept), (64, 64), 0.125)
    # Inputs are rounded to bfloat16 (documented): bfloat16 tolerance plus input rounding.
    assert _rel_l2(cupy.asnumpy(out), ref) <= 2e-2


@pytest.mark.gpu
@gpu
def test_rejects_what_it_cannot_compute():
    import cupy

    from pysparse_attn.backends import cupy as backend

    q = cupy.ones((1, 1, 64, 32), dtype=cupy.float16)
    plan = backend.build_plan(cupy, q, q, None, "natural", 4, (64, 64), 1.0)
    with pytest.raises(ValueError, match="head dim"):
        backend.forward(q, q, q, plan, 0, 0.0, 1.0, False)
    q = cupy.ones((1, 1, 64, 64), dtype=cupy.float16)
    plan = backend.build_plan(cupy, q, q, None, "natural", 4, (32, 32), 1.0)
    with pytest.raises(ValueError, match="block"):
        backend.forward(q, q, q, plan, 0, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="dtype"):
        backend.forward(q, q.astype(cupy.float32), q, plan, 0, 0.0, 1.0, False)
    plan = backend.build_plan(cupy, q, q, None, "natural", 4, (64, 64), 1.0)
    with pytest.raises(ValueError, match="kernel"):
        backend.forward(q, q, q, plan, 0, 0.0, 1.0, False, kernel="tensor-magic")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("feature_map", ["softmax", "elu1", "relu"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_linear_branch_matches_reference(feature_map, eps):
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 199, 261, 64
    block = (64, 64)
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))
    marginal = rng.random((B, Hq, tile_count(Nq, 64), tile_count(Nk, 64))) < 0.5
    marginal[0, 0, 0] = False  # a query tile with no marginal tile: zero rows
    got = backend.linear_branch(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                cupy.asarray(marginal), block, feature_map, eps)
    want = _reference.linear_branch(q, k, v, marginal, block, feature_map, eps)
    got = cupy.asnumpy(got)
    assert got.dtype == np.float32
    # float32 GEMMs over at most Nk terms: ~1e-6 relative per term, far under 1e-4.
    assert _rel_l2(got, want) <= 1e-4
    assert (got[0, 0, :64] == 0).all()


@pytest.mark.gpu
@gpu
def test_public_api_with_torch_tensors_round_trips_through_dlpack():
    torch = pytest.importorskip("torch", reason="torch is needed for the DLPack round trip")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import pysparse_attn as psa

    generator = torch.Generator(device="cuda").manual_seed(int(_fresh_rng().integers(1 << 31)))
    q, k, v = (torch.randn(1, 333, 4, 128, device="cuda", dtype=torch.bfloat16,
                           generator=generator) for _ in range(3))
    out, stats = psa.attention(q, k, v, layout="bnhd", skip=psa.Recall(0.9), block=(128, 64),
                               return_stats=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert out.shape == q.shape and out.device == q.device
    assert isinstance(stats.kept, torch.Tensor), "stats come back in the caller's namespace"
    kept = stats.kept.cpu().numpy()
    exact = [x.float().cpu().numpy().astype(np.float64).transpose(0, 2, 1, 3) for x in (q, k, v)]
    ref, _ = _reference.masked_attention(*exact, kept, (128, 64), 128 ** -0.5)
    got = out.float().cpu().numpy().astype(np.float64).transpose(0, 2, 1, 3)
    assert _rel_l2(got, ref) <= OUT_TOLERANCE["bfloat16"]


@pytest.mark.gpu
@gpu
def test_public_api_cupy_backend_agrees_with_reference_backend():
    import cupy

    import pysparse_attn as psa

    rng = _fresh_rng()
    (q, k, v), (q64, k64, v64) = _inputs(rng, "float16", 1, 2, 2, 200, 300, 64, "bhnd")
    out, stats = psa.attention(q, k, v, select=psa.TopK(ratio=0.5), backend="cupy",
                               return_stats=True)
    kept = stats.kept.get() if hasattr(stats.kept, "get") else np.asarray(stats.kept)
    ref, _ = _reference.masked_attention(q64, k64, v64, kept, (64, 64), 64 ** -0.5)
    assert isinstance(out, cupy.ndarray)
    assert _rel_l2(cupy.asnumpy(out.astype(cupy.float32)), ref) <= OUT_TOLERANCE["float16"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("selector", [None, TopK(k=3), TopK(ratio=0.3), TopP(0.5), TopP(0.95)],
                         ids=["dense", "topk-3", "topk-ratio", "topp-0.5", "topp-0.95"])
@pytest.mark.parametrize("order", ["natural", "score", "peak"])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
def test_fused_plan_follows_the_selector_definition(selector, order, block):
    """Fused GPU plan vs the float64 block scores: right count, a top set, the right order."""
    import cupy

    from pysparse_attn import _plan
    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, _), (q64, k64, _) = _inputs(rng, "bfloat16", 2, 4, 2, 300, 1000, 64, "bhnd")
    scale = 64 ** -0.5
    plan = _host_plan(backend.build_plan(cupy, q, k, selector, order, 4, block, scale))
    scores = _plan.block_scores(np, q64, k64, block, scale)
    nq, nk = scores.shape[2:]
    assert (plan.nq, plan.nk) == (nq, nk)
    # float32 tile means of exact inputs vs float64: scores agree to ~1e-6; ties within this
    # tolerance may be ordered either way.
    tol = 1e-4
    mass = np.exp(scores - scores.max(axis=-1, keepdims=True))
    mass /= mass.sum(axis=-1, keepdims=True)
    for index in np.ndindex(*plan.count.shape):
        n = plan.count[index]
        entries = plan.visit[index][:n]
        assert (plan.visit[index][n:] == -1).all()
        assert len(set(entries.tolist())) == n and ((entries >= 0) & (entries < nk)).all()
        row = scores[index]
        rest = np.setdiff1d(np.arange(nk), entries)
        if len(rest):
            assert row[entries].min() >= row[rest].max() - tol, "kept set is not a top set"
        if selector is None:
            assert n == nk
        elif isinstance(selector, TopK):
            assert n == selector.count(nk)
        else:
            kept_mass = mass[index][entries].sum()
            assert kept_mass >= selector.p - 1e-5
            assert kept_mass - mass[index][entries].min() < selector.p + 1e-5, "not minimal"
        if order == "natural":
            assert (np.diff(entries) > 0).all()
        elif order == "score":
            assert (np.diff(row[entries]) <= tol).all()
        else:
            head = row[entries[:4]]
            assert (np.diff(head) <= tol).all()
            if n > 4:
                assert head.min() >= row[entries[4:]].max() - tol
                assert (np.diff(row[entries[4:]]) >= -tol).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_block_scores_match_the_estimator(dtype):
    import cupy

    from pysparse_attn import _plan
    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, _), (q64, k64, _) = _inputs(rng, dtype, 2, 6, 3, 333, 517, 128, "bnhd")
    got = cupy.asnumpy(backend.fused_block_scores(q, k, (128, 64), 0.1))
    want = _plan.block_scores(np, q64, k64, (128, 64), 0.1)
    # float32 means of exact 16-bit inputs: relative rounding ~1e-6 of terms of size ~1.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_without_stats_the_output_is_the_same():
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v), _ = _inputs(rng, "bfloat16", 1, 2, 2, 257, 300, 64, "bhnd")
    plan = backend.build_plan(cupy, q, k, None, "peak", 4, (64, 64), 0.125)
    code, param = rule_code(Recall(0.9))
    with_stats = backend.forward(q, k, v, plan, code, param, 0.125, True)
    without = backend.forward(q, k, v, plan, code, param, 0.125, False)
    assert without[2:] == (None, None, None)
    assert bool((with_stats[0] == without[0]).all()) and bool((with_stats[1] == without[1]).all())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("linear", ["marginal", "complement", "global"])
def test_public_sla_attention_on_gpu_matches_reference_parts(linear):
    """O = O_s + O_l W^T + b with the GPU's plan, kept set and linear branch."""
    import cupy

    import pysparse_attn as psa

    rng = _fresh_rng()
    (q, k, v), (q64, k64, v64) = _inputs(rng, "float16", 1, 4, 2, 250, 330, 64, "bhnd")
    weight = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    bias = rng.standard_normal(64).astype(np.float32) * 0.1
    out, stats = psa.sla_attention(q, k, v, critical=0.3, negligible=0.2, linear=linear,
                                   proj_weight=cupy.asarray(weight), proj_bias=cupy.asarray(bias),
                                   backend="cupy", return_stats=True)
    kept, marginal = (cupy.asnumpy(cupy.asarray(x)) for x in (stats.kept, stats.marginal))
    sparse, _ = _reference.masked_attention(q64, k64, v64, kept, (64, 64), 64 ** -0.5)
    eps = 1e-5 if linear == "global" else 0.0
    linear_out = _reference.linear_branch(q64, k64, v64, marginal, (64, 64), "softmax", eps)
    want = sparse + linear_out @ weight.T.astype(np.float64) + bias
    got = cupy.asnumpy(out.astype(cupy.float32)).astype(np.float64)
    assert _rel_l2(got, want) <= OUT_TOLERANCE["float16"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the kernel "
                    "compile check needs the CUDA toolkit")
def test_every_kernel_instance_compiles():
    result = subprocess.run([sys.executable, "-m", "pysparse_attn.backends.compile_check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5/5 family builds ok" in result.stdout
