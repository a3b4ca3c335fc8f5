"""The CUDA backend (``backends/cupy.py`` + ``gpu/*.cu``) against the float64 reference.

Every GPU test is marked ``gpu`` and skipped, with the reason, without CuPy or a CUDA device.
The oracle for an output is exact attention on the kept set the kernel reports
(``_reference.masked_attention``); each skip decision is checked against the rule with a small
margin (``_reference.decision_slack``), since fp32 and float64 may decide differently only
within rounding of the threshold. One non-GPU test compiles every kernel instance when nvcc is
on the PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from contract import csr_plan

from pysparse_attn import _reference
from pysparse_attn._plan import tile_count
from pysparse_attn._rules import Blasst, Cef, Recall
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


# Every forward family on every case where the device runs it (wgmma, sm90_ws: Hopper only).
KERNEL_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(_kernel_skip_reason(name) is not None,
                                                reason=str(_kernel_skip_reason(name))))
    for name in ("wgmma", "sm90_ws", "mma_sync")
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
    """A host copy of a plan's CSR rows (what the reference reads), with ``rows(b, h, i)``."""
    import cupy

    offsets, indices = cupy.asnumpy(plan.row_offsets), cupy.asnumpy(plan.row_indices)
    return SimpleNamespace(row_offsets=offsets, row_indices=indices, block=tuple(plan.block),
                           nq=plan.nq, nk=plan.nk, capacity=indices.shape[-1],
                           rows=lambda b, h, i: indices[b, h, offsets[b, h, i]:offsets[b, h, i + 1]])


def _device_plan(rows, block):
    """:func:`contract.csr_plan` with its arrays on the device (what the cupy backend reads)."""
    import cupy

    host = csr_plan(rows, block)
    return SimpleNamespace(row_offsets=cupy.asarray(host.row_offsets),
                           row_indices=cupy.asarray(host.row_indices), block=host.block)


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
    skip = RULES[rule_name] if isinstance(rule_name, str) else rule_name
    scale = D ** -0.5
    order = order or ("peak" if skip is not None else "natural")
    plan = backend.build_plan(cupy, q, k, selector, order, 4, block, scale)
    _poison_pool((B, Hq, Nq, D))
    out, lse, kept, visited, bound = backend.forward(q, k, v, plan, skip, scale, True,
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
        entries = host_plan.rows(*index)
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
    slack = _reference.decision_slack(q64, k64, v64, host_plan, kept_h, skip, scale)
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
    out, _, kept, _, _ = backend.forward(q, k, v, plan, None, 0.125, True)
    ref, _ = _reference.masked_attention(*(cupy.asnumpy(x.astype(cupy.float32)).astype(float)
                                           for x in (q, k, v)), cupy.asnumpy(kept), (64, 64),
                                         0.125)
    assert _rel_l2(cupy.asnumpy(out.astype(cupy.float32)), ref) <= OUT_TOLERANCE["float16"]
    assert bool((wide == before).all())


@pytest.mark.gpu
@gpu
def test_float32_inputs_are_a_type_error_in_the_backend():
    """The backend never computes float32 in bfloat16 on its own (the API's opt-in decides)."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    q = cupy.ones((1, 2, 130, 64), dtype=cupy.float32)
    plan = backend.build_plan(cupy, q.astype(cupy.float16), q.astype(cupy.float16), None,
                              "natural", 4, (64, 64), 0.125)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        backend.forward(q, q, q, plan, None, 0.125, True)


@pytest.mark.gpu
@gpu
def test_rejects_what_it_cannot_compute():
    import cupy

    from pysparse_attn.backends import cupy as backend

    q = cupy.ones((1, 1, 64, 32), dtype=cupy.float16)
    plan = backend.build_plan(cupy, q, q, None, "natural", 4, (64, 64), 1.0)
    with pytest.raises(ValueError, match="head dim"):
        backend.forward(q, q, q, plan, None, 1.0, False)
    q = cupy.ones((1, 1, 64, 64), dtype=cupy.float16)
    plan = backend.build_plan(cupy, q, q, None, "natural", 4, (32, 32), 1.0)
    with pytest.raises(ValueError, match="block"):
        backend.forward(q, q, q, plan, None, 1.0, False)
    with pytest.raises(TypeError, match="dtype"):
        backend.forward(q, q.astype(cupy.float32), q, plan, None, 1.0, False)
    plan = backend.build_plan(cupy, q, q, None, "natural", 4, (64, 64), 1.0)
    with pytest.raises(ValueError, match="kernel"):
        backend.forward(q, q, q, plan, None, 1.0, False, kernel="tensor-magic")
    with pytest.raises(TypeError, match="out_dtype"):
        backend.forward(q, q, q, plan, None, 1.0, False, out_dtype=np.float64)
    with pytest.raises(ValueError, match="skip"):
        backend.forward(q, q, q, plan, Blasst(np.array([0.1, 0.2])), 1.0, False)


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
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_plan_follows_the_selector_definition(selector, order, block, dtype):
    """GPU plan vs the float64 block scores: right count, a top set, the right order; bf16
    through the fused kernels, float32 through the generic builder on plan_block_scores."""
    import cupy

    from pysparse_attn import _plan
    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, _), (q64, k64, _) = _inputs(rng, dtype, 2, 4, 2, 300, 1000, 64, "bhnd")
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
    for index in np.ndindex(*plan.row_offsets.shape[:2], nq):
        entries = plan.rows(*index)
        n = len(entries)
        assert (plan.row_indices[index[:2]][plan.row_offsets[index[:2]][-1]:] == -1).all()
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
@pytest.mark.parametrize("order", ["natural", "score", "peak"])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
def test_fused_mask_plan_visits_exactly_the_mask_in_order(order, block):
    """BlockMask (and the internal ``mask=``) through the selection kernel: exactly the mask's
    tiles, empty rows empty, full rows and sink columns whole, in the order's definition."""
    import cupy

    from pysparse_attn import _plan
    from pysparse_attn._select import BlockMask
    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, _), (q64, k64, _) = _inputs(rng, "bfloat16", 2, 4, 2, 300, 1000, 64, "bhnd")
    scale = 64 ** -0.5
    nq, nk = tile_count(300, block[0]), tile_count(1000, block[1])
    mask = rng.random((2, 4, nq, nk)) < rng.choice([0.05, 0.5, 0.95])
    mask[0, 0, 0] = False   # a row with no tile
    mask[1, 2, :, 3] = True  # a sink key tile
    mask[1, 3, 1] = True     # a full row
    plan = _host_plan(backend.build_plan(cupy, q, k, BlockMask(cupy.asarray(mask)), order, 4,
                                         block, scale))
    scores = backend.plan_block_scores(q, k, block, scale)
    internal = _host_plan(backend.build_plan(cupy, q, k, None, order, 4, block, scale,
                                             mask=cupy.asarray(mask), scores=scores))
    np.testing.assert_array_equal(plan.row_offsets, internal.row_offsets)
    np.testing.assert_array_equal(plan.row_indices, internal.row_indices)
    reference = _plan.block_scores(np, q64, k64, block, scale)
    tol = 1e-4  # float32 tile means vs float64, as in the selector test above
    for index in np.ndindex(2, 4, nq):
        entries = plan.rows(*index)
        np.testing.assert_array_equal(np.sort(entries), np.flatnonzero(mask[index]))
        row = reference[index]
        if order == "natural":
            assert (np.diff(entries) > 0).all()
        elif order == "score":
            assert (np.diff(row[entries]) <= tol).all()
        elif len(entries) > 4:
            head = row[entries[:4]]
            assert head.min() >= row[entries[4:]].max() - tol
            assert (np.diff(row[entries[4:]]) >= -tol).all()
    for b, h in np.ndindex(2, 4):
        assert (plan.row_indices[b, h][plan.row_offsets[b, h][-1]:] == -1).all()


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
    with_stats = backend.forward(q, k, v, plan, Recall(0.9), 0.125, True)
    without = backend.forward(q, k, v, plan, Recall(0.9), 0.125, False)
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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("Nq,Nk", [(1, 77), (129, 300), (200, 64)])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_rows_with_no_visited_tile_give_zero_output_and_minus_infinity_lse(dtype, Nq, Nk, block,
                                                                         kernel):
    """The kernel itself writes O = 0, LSE = -inf and recall bound 1 for an empty plan row
    (nothing visited or kept there); the other rows are exact attention on their tiles."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, D = 2, 2, 1, 64
    (q, k, v), (q64, k64, v64) = _inputs(rng, dtype, B, Hq, Hkv, Nq, Nk, D, "bhnd")
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    rows = [[[[] if (b + h + i) % 2 == 0 else list(rng.permutation(nk)[:1 + i % nk])
              for i in range(nq)] for h in range(Hq)] for b in range(B)]
    plan = _device_plan(rows, block)
    _poison_pool((B, Hq, Nq, D))
    out, lse, kept, visited, bound = backend.forward(q, k, v, plan, Recall(0.9), D ** -0.5,
                                                     True, kernel=kernel)
    out_h = cupy.asnumpy(out.astype(cupy.float32)).astype(np.float64)
    lse_h, kept_h, visited_h, bound_h = (cupy.asnumpy(x) for x in (lse, kept, visited, bound))
    empty_tiles = np.array([[[len(row) == 0 for row in rows[b][h]] for h in range(Hq)]
                            for b in range(B)])
    empty = np.repeat(empty_tiles, block[0], axis=-1)[..., :Nq]
    assert (out_h[empty] == 0).all(), "an empty row's output is not zero"
    assert (lse_h[empty] == -np.inf).all() and (bound_h[empty] == 1).all()
    assert not visited_h[empty_tiles].any() and not kept_h[empty_tiles].any()
    ref_out, ref_lse = _reference.masked_attention(q64, k64, v64, kept_h, block, D ** -0.5)
    if (~empty).any():
        assert _rel_l2(out_h[~empty], ref_out[~empty]) <= OUT_TOLERANCE[dtype]
        assert np.max(np.abs(lse_h[~empty] - ref_lse[~empty])) <= LSE_TOLERANCE


PER_HEAD_RULES = {
    "blasst": Blasst(np.array([1e-3, 0.2, 1.0, 0.03])),
    "cef": Cef(np.array([-2.0, -8.0, -0.5, 0.0])),
    "recall": Recall(np.array([0.5, 0.9, 1.0, 0.7])),
    "recall_exact": Recall(np.array([0.5, 0.9, 1.0, 0.7]), exact=True),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rule_name", list(PER_HEAD_RULES))
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_per_head_decisions_follow_the_reference_at_odd_sizes(rule_name, kernel):
    """Each decision of a per-head rule within the margin of the float64 replay."""
    rng = _fresh_rng()
    for Nq, Nk in ((1, 300), (129, 1000)):
        _run_and_check(rng, dtype="float16", D=128, block=(128, 64), layout="bhnd",
                       rule_name=PER_HEAD_RULES[rule_name], selector=None, Nq=Nq, Nk=Nk, B=1,
                       Hq=4, Hkv=2, kernel=kernel)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_out_dtype_float32_writes_the_unrounded_output(dtype, kernel):
    """``out_dtype=float32``: O before its rounding (rounding it on the host, to nearest even,
    gives the default output bit for bit); statistics unchanged."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v), _ = _inputs(rng, dtype, 1, 2, 1, 157, 260, 128, "bnhd")
    plan = backend.build_plan(cupy, q, k, None, "peak", 4, (128, 64), 128 ** -0.5)
    wide = backend.forward(q, k, v, plan, Blasst(0.05), 128 ** -0.5, True, out_dtype=np.float32,
                           kernel=kernel)
    narrow = backend.forward(q, k, v, plan, Blasst(0.05), 128 ** -0.5, True, kernel=kernel)
    assert wide[0].dtype == np.float32 and narrow[0].dtype == q.dtype
    for a, b in zip(wide[1:], narrow[1:]):
        assert bool((a == b).all())
    wide_h = cupy.asnumpy(wide[0])
    narrow_h = cupy.asnumpy(narrow[0].view(cupy.uint16))
    rounded = wide_h.astype(_dtype(dtype)).view(np.uint16)
    np.testing.assert_array_equal(rounded, narrow_h)
    assert (wide_h != rounded.view(_dtype(dtype)).astype(np.float32)).any(), "O was rounded"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the kernel "
                    "compile check needs the CUDA toolkit")
def test_every_kernel_instance_compiles():
    result = subprocess.run([sys.executable, "-m", "pysparse_attn.backends.compile_check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    built = re.search(r"compile_check: (\d+)/(\d+) family builds ok", result.stdout)
    assert built and built.group(1) == built.group(2), result.stdout[-2000:]
    assert "attention_forward_sm90_ws.cu for sm_90a" in result.stdout
    # A serialised wgmma pipeline is silent in results and costs the warp-specialised
    # forward its overlap (C7515: every wgmma waited for the one before).
    serialised = [line for line in result.stdout.splitlines() if "WGMMA SERIALISED" in line]
    assert not serialised, "\n".join(serialised)


# ---------------------------------------------------------------------------------------------
# The warp-specialised kernel (sm90_ws): what the shared contract tests above do not reach.

WS = [pytest.param("sm90_ws", marks=pytest.mark.skipif(
    _kernel_skip_reason("sm90_ws") is not None, reason=str(_kernel_skip_reason("sm90_ws"))))]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the layout "
                    "check compiles the kernel's traits for the host")
def test_sm90_ws_host_table_matches_the_kernel_layout(tmp_path):
    """The host's parameter image and shared-memory sizes (cupy.py, SM90_WS_CONFIGS) equal what
    the kernel's headers lay out: sizeof / offsetof of the parameter struct and
    WarpSpecializedTraits::kSharedBytes for every configuration."""
    from pysparse_attn.backends import cupy as backend

    configs = sorted(backend.SM90_WS_CONFIGS.items())
    lines = ['#include <cstdio>', '#include <cstddef>', '#include "forward_params.cuh"',
             '#include "tma.cuh"', '#include "tile_traits_sm90.cuh"',
             # the kernel file's struct, restated: its definition sits beside the kernel
             'struct alignas(64) P { psa::TensorMap q, k, v; psa::ForwardParams base; };',
             'int main() {', '  std::printf("%zu %zu\\n", sizeof(P), offsetof(P, base));']
    for (d, bq), (ks, vs) in configs:
        lines.append(f'  std::printf("%u\\n", psa::WarpSpecializedTraits<{d}, {bq}, {ks}, '
                     f'{vs}>::kSharedBytes);')
    lines.append("}")
    printed = _host_program_output(tmp_path, lines)
    dtype = backend._WS_PARAMS_DTYPE
    assert [int(printed[0]), int(printed[1])] == [dtype.itemsize, dtype.fields["base"][1]]
    assert [int(x) for x in printed[2:]] == [backend._shared_bytes_sm90_ws(d, bq)
                                             for (d, bq), _ in configs]


def _host_program_output(tmp_path, lines):
    """What the C++ program ``lines`` (which may include gpu/ headers) prints, split on blanks:
    built with nvcc for the host and run."""
    from pysparse_attn.backends import cupy as backend

    source = tmp_path / "layout.cu"
    source.write_text("\n".join(lines) + "\n")
    gpu_dir = Path(backend.__file__).resolve().parents[2] / "gpu"
    build = subprocess.run([shutil.which("nvcc"), "-std=c++17", f"-I{gpu_dir}", str(source), "-o",
                            str(tmp_path / "layout")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    return subprocess.run([str(tmp_path / "layout")], capture_output=True,
                          text=True).stdout.split()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the layout "
                    "check compiles the kernel's traits for the host")
def test_sm90_backward_host_sizes_match_the_kernel_layout(tmp_path):
    """The shared memory the host passes to the wgmma dK/dV passes (_backward_shared_bytes) is
    BackwardWarpgroupTraits::kSharedBytes, for every sm90 family and head dim."""
    from pysparse_attn.backends import cupy as backend

    lines = ['#include <cstdio>', '#include "backward_tiles_sm90.cuh"', 'int main() {']
    families = [name for name, family in sorted(backend.BACKWARD_KERNELS.items())
                if family.source == "attention_backward_sm90.cu"]
    lines += [f'  std::printf("%u\\n", psa::BackwardWarpgroupTraits<{d}, '
              f'{backend.BACKWARD_KERNELS[name].key_tiles}>::kSharedBytes);'
              for name in families for d in backend.supported_head_dims()]
    lines.append("}")
    printed = _host_program_output(tmp_path, lines)
    assert families and [int(x) for x in printed] == [
        backend._backward_shared_bytes("dkdv", d, name)
        for name in families for d in backend.supported_head_dims()]


def test_backward_ablation_variants_are_the_kernels_macros():
    """bench/backward_ablation.py times every PSA_ABLATE_BWD_* (ablation) and PSA_BWD_*
    (schedule) macro the wgmma dK/dV source documents and tests, and no other (a renamed macro
    would silently time the baseline)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("backward_ablation",
                                                      root / "bench" / "backward_ablation.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root / "bench"))
    source = (root / "gpu" / "attention_backward_sm90.cu").read_text()
    for table, prefix in ((module.VARIANTS, "PSA_ABLATE_BWD_"), (module.SCHEDULES, "PSA_BWD_")):
        timed = {macro for macros in table.values() for macro in macros}
        tested = set(re.findall(rf"#if(?:n?def| defined\()\s*({prefix}\w+)", source))
        documented = set(re.findall(rf"^//\s+({prefix}\w+)", source, flags=re.M))
        assert timed and timed == tested == documented, (timed, tested, documented)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the layout "
                    "check compiles the kernel's headers for the host")
def test_dq_tile_layout_is_one_to_one(tmp_path):
    """DqTileLayout (the Hopper dQ accumulator's order) puts every (row, column) of a 64-row x
    D step at exactly one float of its contiguous 64 x D block, each thread's pair of columns
    adjacent (the float2 the postprocess stores), for D = 64 and 128."""
    lines = ['#include <cstdio>', '#include "backward_tiles.cuh"', 'int main() {',
             '  for (int halves = 1; halves <= 2; ++halves)',
             '    for (int half = 0; half < halves; ++half)',
             '      for (int chunk = 0; chunk < 8; ++chunk)',
             '        for (int t = 0; t < 128; ++t)',
             '          for (int r = 0; r < 2; ++r)',
             '            std::printf("%d %d %d %d\\n", halves,',
             '                        psa::DqTileLayout::offset(half, chunk, t) + 2 * r,',
             '                        psa::DqTileLayout::row(t, r),',
             '                        64 * half + psa::DqTileLayout::column(t, chunk));',
             '}']
    printed = np.array(_host_program_output(tmp_path, lines), dtype=np.int64).reshape(-1, 4)
    for halves in (1, 2):
        offset, row, column = printed[printed[:, 0] == halves, 1:].T
        D = 64 * halves
        # Element 2r (the pair's first) of each chunk; its neighbour is the next float.
        assert offset.min() == 0 and offset.max() == 64 * D - 2
        assert len(set(offset.tolist())) == len(offset) == 64 * D // 2
        assert (offset % 2 == 0).all()
        assert (column % 2 == 0).all() and row.max() == 63 and column.max() == D - 2
        assert len(set(zip(row.tolist(), column.tolist()))) == len(row)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the layout "
                    "check compiles the kernel's parameter struct for the host")
def test_backward_params_image_matches_the_struct(tmp_path):
    """The host's image of BackwardParams (_BACKWARD_PARAMS_DTYPE) has the struct's size and
    every field at the struct's offset (a field added on one side only shifts the rest)."""
    from pysparse_attn.backends import cupy as backend

    dtype = backend._BACKWARD_PARAMS_DTYPE
    lines = ['#include <cstdio>', '#include <cstddef>', '#include "backward_params.cuh"',
             'int main() {', '  std::printf("%zu\\n", sizeof(psa::BackwardParams));']
    lines += [f'  std::printf("%zu\\n", offsetof(psa::BackwardParams, {name}));'
              for name in dtype.names]
    lines.append("}")
    printed = [int(x) for x in _host_program_output(tmp_path, lines)]
    assert printed == [dtype.itemsize] + [dtype.fields[name][1] for name in dtype.names]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH: the kernel "
                    "compile check needs the CUDA toolkit")
def test_every_sm90_backward_instance_compiles_without_spills():
    """No sm90 backward instance spills, but one known case: the 128-key CTA at D=128 that
    accumulates dQ sits at 255 registers and spills 28-36 bytes (ptxas, CUDA 13); it still
    measured the fastest dense backward on an H200 (bench/results/backward-v3-20261204). The bound keeps it from
    growing unnoticed; every other instance must stay spill-free."""
    from pysparse_attn.backends.compile_check import compile_family
    from pysparse_attn.backends.cupy import BACKWARD_SM90_INSTANCES, backward_instances

    instances = sorted(set(BACKWARD_SM90_INSTANCES.values()))
    # The known case, from the family table: the 128-key family's atomic-dQ stage at D = 128.
    known = {name for (stage, _, d), name in backward_instances("sm90").items()
             if stage == "dkdv_accumulate_dq" and d == 128}
    assert known, "the known spilling instance is no longer in the tables: update this test"
    ok, rows, log = compile_family(shutil.which("nvcc"), "attention_backward_sm90.cu", instances,
                                   "sm_90a")
    assert ok, log
    assert len(rows) == len(instances), log
    known_spill_bytes = 40
    for row in rows:
        name, stores, loads = row[0], row[3], row[4]
        # Rows carry demangled signatures: "void psa::...<...>(psa::BackwardParams)".
        limit = known_spill_bytes if name.split("(")[0].removeprefix("void ") in known else 0
        assert stores <= limit and loads <= limit, f"{name}: spills {stores} / {loads} bytes"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", WS)
@pytest.mark.parametrize("D,block", [(128, (128, 64)), (64, (64, 64)), (128, (64, 64))])
@pytest.mark.parametrize("rule_name", ["none", "blasst", "recall_exact"])
def test_sm90_ws_skewed_plan_rows_match_the_reference(kernel, D, block, rule_name):
    """Rows of every length from 1 to all key tiles (repeats of the ring many times over next
    to rows shorter than its depth), in random order, with a rule that skips: each output is
    exact attention on the reported kept set, visited is the plan, the first tile is kept."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk = 1, 4, 2, 389, 1283  # partial last query and key tiles
    (q, k, v), (q64, k64, v64) = _inputs(rng, "float16", B, Hq, Hkv, Nq, Nk, D, "bhnd")
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    lengths = rng.integers(1, nk + 1, size=(B, Hq, nq))
    lengths.flat[0], lengths.flat[-1] = 1, nk
    rows = [[[list(rng.permutation(nk)[:lengths[b, h, i]]) for i in range(nq)]
             for h in range(Hq)] for b in range(B)]
    plan = _device_plan(rows, block)
    rule = RULES[rule_name]
    _poison_pool((B, Hq, Nq, D))
    out, lse, kept, visited, _ = backend.forward(q, k, v, plan, rule, D ** -0.5, True,
                                                 kernel=kernel)
    out_h = cupy.asnumpy(out.astype(cupy.float32)).astype(np.float64)
    lse_h, kept_h, visited_h = (cupy.asnumpy(x) for x in (lse, kept, visited))
    assert np.isfinite(out_h).all(), "unwritten (poisoned) or non-finite output"
    listed = np.zeros_like(visited_h)
    for index in np.ndindex(B, Hq, nq):
        listed[index][rows[index[0]][index[1]][index[2]]] = True
        assert kept_h[index][rows[index[0]][index[1]][index[2]][0]], f"first tile skipped {index}"
    np.testing.assert_array_equal(visited_h, listed)
    assert not (kept_h & ~visited_h).any()
    ref_out, ref_lse = _reference.masked_attention(q64, k64, v64, kept_h, block, D ** -0.5)
    error = _rel_l2(out_h, ref_out)
    assert error <= OUT_TOLERANCE["float16"], f"relative L2 error {error:.3g} vs the reference"
    assert np.max(np.abs(lse_h - ref_lse)) <= LSE_TOLERANCE


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", WS)
def test_sm90_ws_reads_strides_the_tma_unit_cannot_by_a_copy(kernel):
    """A key tensor broadcast over heads (head stride 0) has no TMA descriptor: the backend
    copies it, and the result equals the same call on materialised keys; the caller's arrays
    are left as they were."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v), _ = _inputs(rng, "bfloat16", 1, 4, 1, 200, 300, 128, "bhnd")
    k_broadcast = cupy.broadcast_to(k, (1, 4, 300, 128))
    v_full = cupy.ascontiguousarray(cupy.broadcast_to(v, (1, 4, 300, 128)))
    before = cupy.asnumpy(k).copy()
    plan = backend.build_plan(cupy, q, k_broadcast, None, "natural", 4, (128, 64), 128 ** -0.5)
    got = backend.forward(q, k_broadcast, v_full, plan, None, 128 ** -0.5, False,
                          kernel=kernel)[0]
    want = backend.forward(q, cupy.ascontiguousarray(k_broadcast), v_full, plan, None,
                           128 ** -0.5, False, kernel=kernel)[0]
    assert bool((got == want).all()), "broadcast keys gave a different output"
    np.testing.assert_array_equal(cupy.asnumpy(k), before)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", WS)
@pytest.mark.parametrize("rule_name", ["none", "blasst", "recall"])
def test_sm90_ws_agrees_with_the_wgmma_kernel_on_its_kept_set(kernel, rule_name):
    """Same plan, same rule: both Hopper kernels run the same arithmetic (wgmma shapes, fp32
    online softmax, bf16 P), so outputs agree to the rounding of P and decisions agree except
    within the margin; checked on the video-like shape of the benchmarks, scaled down."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    if _kernel_skip_reason("wgmma") is not None:
        pytest.skip(f"wgmma kernel unavailable: {_kernel_skip_reason('wgmma')}")
    rng = _fresh_rng()
    (q, k, v), _ = _inputs(rng, "bfloat16", 1, 2, 2, 2048, 2048, 128, "bhnd", strength=2.0)
    rule = RULES[rule_name]
    plan = backend.build_plan(cupy, q, k, None, "peak" if rule else "natural", 4, (128, 64),
                              128 ** -0.5)
    ws = backend.forward(q, k, v, plan, rule, 128 ** -0.5, True, kernel=kernel)
    ref = backend.forward(q, k, v, plan, rule, 128 ** -0.5, True, kernel="wgmma")
    cupy.cuda.runtime.deviceSynchronize()
    disagree = float((ws[2] != ref[2]).mean())
    assert disagree <= 0.02, f"{disagree:.1%} of kept decisions differ from the wgmma kernel"
    if disagree == 0:
        a, b = (cupy.asnumpy(x[0].astype(cupy.float32)) for x in (ws, ref))
        assert _rel_l2(a, b) <= 1e-2, "outputs differ beyond bf16 rounding of P"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", WS)
@pytest.mark.parametrize("variant", ["PSA_WS_SERIAL_SCORES", "PSA_WS_NO_PINGPONG"])
@pytest.mark.parametrize("dtype, D, block, rule_name", [
    ("bfloat16", 64, (128, 64), "blasst"), ("bfloat16", 128, (128, 64), "blasst"),
    ("bfloat16", 128, (128, 64), "recall_exact"), ("float16", 64, (128, 64), "recall"),
    ("float16", 128, (128, 64), "cef"), ("bfloat16", 128, (128, 64), None),
    ("float16", 64, (128, 64), None)])
def test_sm90_ws_schedules_agree_bitwise(kernel, variant, dtype, D, block, rule_name):
    """The warp-specialised kernel's consumer schedules run the same arithmetic in another
    order of issue: the serial one (PSA_WS_SERIAL_SCORES: Q.K^T of tile j issued at visit j, as
    kernels without a rule and the 64-row instances always run) against the rule kernels'
    pipelined one (Q.K^T one visit ahead), and the two consumers issuing at will
    (PSA_WS_NO_PINGPONG) against taking turns. Output, LSE and kept set agree bit for bit, on
    odd sizes (partial tiles, GQA) where the rule skips, and dense (rule None)."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v), _ = _inputs(rng, dtype, 1, 4, 2, 1000, 1500, D, "bhnd", strength=2.0)
    rule = None if rule_name is None else RULES[rule_name]
    plan = backend.build_plan(cupy, q, k, None, "peak", 4, block, D ** -0.5)
    shipped = backend.forward(q, k, v, plan, rule, D ** -0.5, True, kernel=kernel)
    other = backend.forward(q, k, v, plan, rule, D ** -0.5, True, kernel=kernel,
                            _ablation=(variant,))
    cupy.cuda.runtime.deviceSynchronize()
    skipped = 1 - float(shipped[2].mean())
    if rule is not None:
        assert skipped > 0.05, f"the case must skip tiles (skipped {skipped:.1%})"
    for name, a, b in zip(("out", "lse", "kept"), shipped[:3], other[:3]):
        assert bool((a == b).all()), f"{name} differs between the two schedules ({variant})"
