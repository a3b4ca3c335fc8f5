"""The GPU backward kernels (``gpu/attention_backward.cu`` through
``backends.cupy.attention_backward``) against the float64 reference gradients on the same kept
set, for every dK/dV family of ``backends.cupy.BACKWARD_KERNELS`` (the ``kernel`` fixture:
``mma_sync``, and ``sm90`` / ``sm90_k64``, wgmma, skipped off compute capability 9.0).

Every test is marked ``gpu`` and skipped, with the reason, without CuPy or a CUDA device. The
oracle is ``_reference.attention_backward`` (the reference backend's vjp) on the exact float64
values of the rounded 16-bit inputs. Tolerances follow the flash-attention rule: the kernel's
error must stay within about twice that of a naive computation in the same precision
(:func:`_naive_backward`, which rounds P and dS to the 16-bit type before its products, as any
16-bit tensor-core backward must), plus a small floor for fp32 accumulation order.
"""

from __future__ import annotations

import numpy as np
import pytest

from pysparse_attn import _reference
from pysparse_attn._plan import Plan, tile_count


def _gpu_skip_reason():
    try:
        from pysparse_attn.backends import cupy as backend
    except Exception as error:  # the module imports no CuPy at import time; be safe anyway
        return f"cupy backend not importable: {error}"
    return backend.unavailable_reason()


_REASON = _gpu_skip_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_REASON is not None, reason=f"GPU backward tests need CuPy and "
                                 f"a CUDA device of compute capability >= 8.0: {_REASON}")]


def _backward_families():
    try:
        from pysparse_attn.backends import cupy as backend
    except Exception:  # reported by _REASON; collection must not break
        return ["mma_sync"]
    return sorted(backend.BACKWARD_KERNELS)


@pytest.fixture(params=_backward_families())
def kernel(request):
    """A dK/dV family of BACKWARD_KERNELS, skipped where this device cannot run it."""
    from pysparse_attn.backends import cupy as backend

    reason = backend.backward_kernel_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param

#: Floor of the relative L2 error: fp32 accumulation in another order than float64 (atomics
#: add dQ contributions in arrival order) plus exp2.approx, well below the 16-bit rounding.
ERROR_FLOOR = 1e-3
#: Upper bound whatever the naive error: bf16 keeps 8 significant bits (P, dS rounded: about
#: 4e-3 each, relative L2 over long sums ~1e-2), fp16 11 bits (~8x smaller).
GRAD_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _fresh_rng():
    """A generator on a fresh seed, printed so that a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _device(x, dtype, layout):
    """``x`` (float32, B,H,N,D) on the GPU in ``dtype``; ``"bnhd"``: a (B, N, H, D) buffer seen
    through a transposed view. Also returns the exact float64 values of the rounded array."""
    import cupy

    if layout == "bnhd":
        y = cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).astype(_dtype(dtype))
        y = y.transpose(0, 2, 1, 3)
    else:
        y = cupy.asarray(x).astype(_dtype(dtype))
    return y, cupy.asnumpy(y.astype(cupy.float32)).astype(np.float64)


def _problem(rng, dtype, B, Hq, Hkv, Nq, Nk, D, layout="bhnd"):
    host = [rng.standard_normal((B, Hq, Nq, D)).astype(np.float32) * 1.5,
            rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32) * 1.5,
            rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32),
            rng.standard_normal((B, Hq, Nq, D)).astype(np.float32)]
    pairs = [_device(x, dtype, layout) for x in host]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _kept(rng, B, Hq, nq, nk, density=0.4, sink=0, empty_column=None):
    """Random kept set: every query tile keeps the `sink` key tile (a long key-major list) and at
    least one tile; `empty_column` is kept by nobody (exact zeros expected there)."""
    kept = rng.random((B, Hq, nq, nk)) < density
    if sink is not None:
        kept[..., sink] = True
    if empty_column is not None:
        kept[..., empty_column] = False
    return kept


def _naive_backward(q, k, v, do, kept, block, scale, dtype):
    """A naive 16-bit backward: float32 arithmetic with P and dS rounded to ``dtype`` before
    the products that consume them (what a tensor-core kernel must do)."""
    low = _dtype(dtype)
    round_ = lambda x: x.astype(low).astype(np.float32)  # noqa: E731
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dq = np.zeros((B, Hq, Nq, D), np.float32)
    dk = np.zeros((B, Hkv, Nk, D), np.float32)
    dv = np.zeros((B, Hkv, Nk, D), np.float32)
    mask = np.repeat(np.repeat(kept, block[0], axis=2), block[1], axis=3)[:, :, :Nq, :Nk]
    for b in range(B):
        for h in range(Hq):
            qh, doh = q[b, h].astype(np.float32), do[b, h].astype(np.float32)
            kh, vh = k[b, h // group].astype(np.float32), v[b, h // group].astype(np.float32)
            s = np.where(mask[b, h], scale * (qh @ kh.T), -np.inf)
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            p /= p.sum(axis=1, keepdims=True)
            out = round_(p) @ vh
            dp = doh @ vh.T
            ds = p * (dp - (doh * out).sum(axis=1, keepdims=True))
            dq[b, h] = scale * (round_(ds) @ kh)
            dk[b, h // group] += scale * (round_(ds).T @ qh)
            dv[b, h // group] += round_(p).T @ doh
    return dq, dk, dv


def _rel_l2(a, b):
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def _host64(x):
    import cupy

    return cupy.asnumpy(x.astype(cupy.float32)).astype(np.float64)


def _check_grads(grads, exact, kept, block, scale, dtype, label=""):
    """Each gradient within 2x the naive 16-bit error (+ floor) and under GRAD_TOLERANCE."""
    q, k, v, do = exact
    reference = _reference.attention_backward(q, k, v, do, kept, block, scale)
    naive = _naive_backward(q, k, v, do, kept, block, scale, dtype)
    for name, got, want, rough in zip(("dq", "dk", "dv"), grads, reference, naive):
        got = _host64(got)
        assert got.shape == want.shape, f"{label}{name}: shape {got.shape} != {want.shape}"
        assert np.isfinite(got).all(), f"{label}{name}: non-finite (unwritten or NaN) values"
        error, naive_error = _rel_l2(got, want), _rel_l2(rough, want)
        bound = min(2 * naive_error + ERROR_FLOOR, GRAD_TOLERANCE[dtype])
        assert error <= bound, (f"{label}{name}: relative L2 error {error:.3g} > {bound:.3g} "
                                f"(naive {dtype} error {naive_error:.3g})")


def _poison_pool(shape, dtype):
    """Leave NaN in the pool blocks the next allocations of ``shape`` may reuse (0xFFFF is NaN in
    both 16-bit types; 0xFFFFFFFF in float32)."""
    import cupy

    words = cupy.uint16 if np.dtype(dtype).itemsize == 2 else cupy.uint32
    poison = [cupy.full(shape, -1, dtype=cupy.int64).view(words) for _ in range(4)]
    del poison


CASES = [(dtype, D, block, layout)
         for dtype in ("bfloat16", "float16")
         for D in (64, 128)
         for block in ((64, 64), (128, 64))
         for layout in ("bhnd", "bnhd")]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype,D,block,layout", CASES)
def test_backward_matches_reference(dtype, D, block, layout, deterministic, kernel):
    """Odd sizes (partial query and key tiles), cross-attention, GQA, a sink key tile, a key
    tile nobody keeps (exact zero dK/dV), outputs over poisoned memory."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 197, 251
    (q, k, v, do), exact = _problem(rng, dtype, B, Hq, Hkv, Nq, Nk, D, layout)
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    kept = _kept(rng, B, Hq, nq, nk, sink=0, empty_column=2)
    scale = D ** -0.5
    _poison_pool((B, Hq, Nq, D), np.float32)
    grads = backend.attention_backward(q, k, v, do, cupy.asarray(kept), block, scale,
                                       deterministic=deterministic, kernel=kernel)
    for g, shape in zip(grads, ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))):
        assert g.dtype == np.float32 and g.shape == shape and g.flags.c_contiguous
    _check_grads(grads, exact, kept, block, scale, dtype)
    for name, g in zip(("dk", "dv"), grads[1:]):
        column = cupy.asnumpy(g[:, :, 2 * 64:3 * 64])
        assert (column == 0).all(), f"{name}: key tile kept by nobody is not exactly zero"


@pytest.mark.parametrize("fast", ["sm90", "sm90_k64"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
def test_sm90_agrees_with_mma_sync(D, block, fast):
    """The wgmma dK/dV pass against the mma.sync one on the same kept set and inputs: both
    round P and dS to bf16, so they differ by rounding order only (dK/dV at the bf16 level of
    a few elements, dQ by atomics order too)."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    reason = backend.backward_kernel_unavailable_reason(fast)
    if reason is not None:
        pytest.skip(reason)
    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk = 1, 4, 2, 333, 290
    (q, k, v, do), _ = _problem(rng, "bfloat16", B, Hq, Hkv, Nq, Nk, D)
    kept = cupy.asarray(_kept(rng, B, Hq, tile_count(Nq, block[0]), tile_count(Nk, 64),
                              sink=1, empty_column=3))
    for deterministic in (False, True):
        base, grads = (backend.attention_backward(q, k, v, do, kept, block, D ** -0.5,
                                                  deterministic=deterministic, kernel=name)
                       for name in ("mma_sync", fast))
        for name, a, b in zip(("dq", "dk", "dv"), grads, base):
            assert _rel_l2(_host64(a), _host64(b)) <= 2e-2, name
        if deterministic:  # the same dQ pass on the same lists
            cupy.testing.assert_array_equal(grads[0], base[0], err_msg="dq")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_grad_dtype_rounds_the_float32_gradients(dtype, kernel):
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, H, N, D, block = 1, 2, 160, 64, (64, 64)
    (q, k, v, do), exact = _problem(rng, dtype, B, H, H, N, N, D)
    kept = cupy.asarray(_kept(rng, B, H, 3, 3))
    for deterministic in (False, True):
        wide = backend.attention_backward(q, k, v, do, kept, block, D ** -0.5,
                                          deterministic=deterministic, kernel=kernel)
        narrow = backend.attention_backward(q, k, v, do, kept, block, D ** -0.5,
                                            deterministic=deterministic, grad_dtype=q.dtype,
                                            kernel=kernel)
        for name, w, n in zip(("dq", "dk", "dv"), wide, narrow):
            assert n.dtype == q.dtype and n.flags.c_contiguous, name
            np.testing.assert_allclose(_host64(n), _host64(w), rtol=2e-2 if dtype == "bfloat16"
                                       else 2e-3, atol=1e-3, err_msg=name)


def test_rows_with_no_kept_tile_get_zero_dq_and_contribute_nothing(kernel):
    """A query tile that keeps nothing (LSE = -inf) must not produce NaN anywhere."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    dtype, B, H, Nq, Nk, D, block = "bfloat16", 1, 2, 256, 200, 128, (64, 64)
    (q, k, v, do), exact = _problem(rng, dtype, B, H, H, Nq, Nk, D)
    kept = _kept(rng, B, H, 4, 4, density=0.5)
    kept[:, :, 1] = False  # query tile 1 (rows 64..127, a full tile) keeps nothing
    for deterministic in (False, True):
        dq, dk, dv = backend.attention_backward(q, k, v, do, cupy.asarray(kept), block,
                                                D ** -0.5, deterministic=deterministic,
                                                kernel=kernel)
        assert (cupy.asnumpy(dq[:, :, 64:128]) == 0).all(), "dq of rows with no kept tile"
        # The reference on the problem without that tile (its rows contribute nothing).
        rows = np.r_[0:64, 128:Nq]
        sub = [exact[0][:, :, rows], exact[1], exact[2], exact[3][:, :, rows]]
        sub_kept = np.delete(kept, 1, axis=2)
        reference = _reference.attention_backward(*sub, sub_kept, block, D ** -0.5)
        got = [_host64(dq)[:, :, rows], _host64(dk), _host64(dv)]
        for name, g, want in zip(("dq", "dk", "dv"), got, reference):
            assert np.isfinite(g).all(), f"{name}: non-finite values"
            assert _rel_l2(g, want) <= GRAD_TOLERANCE[dtype], name


@pytest.mark.parametrize("D", [64, 128])
def test_long_key_major_list_and_wide_gqa_group(D, kernel):
    """A sink key tile kept by every query tile of every query head of a group of 4: one
    dK/dV CTA walks 4 x 48 x 2 steps (128-row tiles in 64-row halves). At D = 128 the 64-key
    wgmma CTA stages dQ in its step's Q and dO buffers, reused by every other step."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    dtype, B, Hq, Hkv, Nq, Nk, block = "bfloat16", 1, 4, 1, 48 * 128 - 5, 300, (128, 64)
    (q, k, v, do), exact = _problem(rng, dtype, B, Hq, Hkv, Nq, Nk, D)
    kept = _kept(rng, B, Hq, 48, tile_count(Nk, 64), density=0.1, sink=3)
    for deterministic in (False, True):
        grads = backend.attention_backward(q, k, v, do, cupy.asarray(kept), block, D ** -0.5,
                                           deterministic=deterministic, kernel=kernel)
        _check_grads(grads, exact, kept, block, D ** -0.5, dtype,
                     label=f"deterministic={deterministic}: ")


@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
def test_deterministic_mode_is_bitwise_stable(block, kernel):
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 700, 650, 128
    (q, k, v, do), _ = _problem(rng, "bfloat16", B, Hq, Hkv, Nq, Nk, D)
    kept = cupy.asarray(_kept(rng, B, Hq, tile_count(Nq, block[0]), tile_count(Nk, 64),
                              density=0.6))
    runs = [backend.attention_backward(q, k, v, do, kept, block, D ** -0.5, deterministic=True,
                                       kernel=kernel)
            for _ in range(3)]
    for name, first, again, third in zip(("dq", "dk", "dv"), *runs):
        cupy.testing.assert_array_equal(first.view(cupy.uint32), again.view(cupy.uint32),
                                        err_msg=name)
        cupy.testing.assert_array_equal(first.view(cupy.uint32), third.view(cupy.uint32),
                                        err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_given_out_and_lse_agree_with_recomputed(dtype, kernel):
    """The forward's float32 (out, lse) give the very bytes of the recomputation (it runs the
    same forward); a 16-bit out agrees within the rounding of O in delta."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk, D, block = 1, 4, 2, 333, 200, 128, (128, 64)
    (q, k, v, do), exact = _problem(rng, dtype, B, Hq, Hkv, Nq, Nk, D)
    kept_host = _kept(rng, B, Hq, tile_count(Nq, 128), tile_count(Nk, 64), density=0.5)
    kept = cupy.asarray(kept_host)
    plan = Plan.from_kept(kept, block=block, shape=(B, Hq, Nq, Nk))
    scale = D ** -0.5
    recomputed = backend.attention_backward(q, k, v, do, kept, block, scale, deterministic=True,
                                            kernel=kernel)
    out32, lse = backend.forward(q, k, v, plan, None, scale, False, out_dtype=np.float32)[:2]
    given = backend.attention_backward(q, k, v, do, kept, block, scale, out=out32, lse=lse,
                                       deterministic=True, kernel=kernel)
    for name, a, b in zip(("dq", "dk", "dv"), recomputed, given):
        cupy.testing.assert_array_equal(a, b, err_msg=name)
    out16 = backend.forward(q, k, v, plan, None, scale, False)[0]
    rounded = backend.attention_backward(q, k, v, do, kept, block, scale, out=out16, lse=lse,
                                         kernel=kernel)
    _check_grads(rounded, exact, kept_host, block, scale, dtype, label="16-bit out: ")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_merged_output_stands_for_the_sparse_output(bias, kernel):
    """SLA's merged output out = O_s + Y + b with (b, rowsum(dO * Y)) gives what O_s itself
    gives: delta is all the backward takes from O, and only its float32 rounding differs."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk, D, block = 1, 4, 2, 333, 200, 128, (128, 64)
    (q, k, v, do), _ = _problem(rng, "bfloat16", B, Hq, Hkv, Nq, Nk, D)
    kept = cupy.asarray(_kept(rng, B, Hq, tile_count(Nq, 128), tile_count(Nk, 64), density=0.5))
    plan = Plan.from_kept(kept, block=block, shape=(B, Hq, Nq, Nk))
    scale = D ** -0.5
    o_sparse, lse = backend.forward(q, k, v, plan, None, scale, False, out_dtype=np.float32)[:2]
    y = cupy.asarray(rng.standard_normal((B, Hq, Nq, D)).astype(np.float32))
    b = cupy.asarray(rng.standard_normal(D).astype(np.float32)) if bias else None
    merged = (o_sparse + y + (0 if b is None else b)).astype(q.dtype)  # the forward's out
    # The O_s the merged output stands for, and the linear term's row dots, in float64.
    merged64, do64 = (x.astype(cupy.float64) for x in (merged, do))
    explicit = (merged64 - y - (0 if b is None else b)).astype(cupy.float32)
    row_dot = cupy.einsum("bhid,bhid->bhi", do64, y.astype(cupy.float64)).astype(cupy.float32)
    want = backend.attention_backward(q, k, v, do, kept, block, scale, out=explicit, lse=lse,
                                      deterministic=True, kernel=kernel)
    got = backend.attention_backward(q, k, v, do, kept, block, scale, lse=lse,
                                     out=backend.MergedOutput(merged, b, row_dot),
                                     deterministic=True, kernel=kernel)
    # A delta off by the bias or the linear term moves every gradient by O(1).
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        error = _rel_l2(_host64(a), _host64(w))
        assert error < 1e-4, (name, error)
    with pytest.raises(ValueError, match="out.bias"):
        backend.attention_backward(q, k, v, do, kept, block, scale, lse=lse, kernel=kernel,
                                   out=backend.MergedOutput(merged, y[0, 0, 0, :64], row_dot))
    with pytest.raises(ValueError, match="out.linear_row_dot"):
        backend.attention_backward(q, k, v, do, kept, block, scale, lse=lse, kernel=kernel,
                                   out=backend.MergedOutput(merged, b, row_dot[..., :-1]))


def test_outputs_do_not_depend_on_prior_memory(kernel):
    """Two calls over differently poisoned pools give the same deterministic bytes."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, H, Nq, Nk, D, block = 1, 2, 190, 130, 64, (64, 64)
    (q, k, v, do), _ = _problem(rng, "float16", B, H, H, Nq, Nk, D)
    kept = cupy.asarray(_kept(rng, B, H, 3, 3, empty_column=1))
    results = []
    for fill in (-1, 0x3C003C00):  # NaN words, then 1.0 in both halves
        pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(pool.malloc):
            junk = [cupy.full((B, H, 256, D), fill, dtype=cupy.int32) for _ in range(8)]
            del junk
            for deterministic in (False, True):
                for grad_dtype in (None, q.dtype):
                    results.append(backend.attention_backward(
                        q, k, v, do, kept, block, D ** -0.5, deterministic=deterministic,
                        grad_dtype=grad_dtype, kernel=kernel))
    half = len(results) // 2
    for index in (2, 3):  # the deterministic ones: bitwise equal whatever the pool held
        for name, a, b in zip(("dq", "dk", "dv"), results[index], results[index + half]):
            cupy.testing.assert_array_equal(a.view(cupy.uint16), b.view(cupy.uint16),
                                            err_msg=name)
    for run in results:
        for g in run:
            assert bool(cupy.isfinite(g.astype(cupy.float32)).all())


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_graph_capturable(deterministic, kernel):
    """No host synchronisation: the whole call (lists, forward recompute, kernels) records into
    a CUDA graph whose replay reproduces the eager result."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk, D, block = 1, 4, 2, 300, 260, 128, (64, 64)
    (q, k, v, do), _ = _problem(rng, "bfloat16", B, Hq, Hkv, Nq, Nk, D)
    kept = cupy.asarray(_kept(rng, B, Hq, tile_count(Nq, 64), tile_count(Nk, 64)))

    def call():
        return backend.attention_backward(q, k, v, do, kept, block, D ** -0.5,
                                          deterministic=deterministic, grad_dtype=q.dtype,
                                          kernel=kernel)

    eager = call()
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        call()
        stream.synchronize()
        stream.begin_capture()
        captured = call()
        graph = stream.end_capture()
    for g in captured:
        g.view(cupy.uint16).fill(0xFFFF)
    graph.launch(stream)
    stream.synchronize()
    for name, a, b in zip(("dq", "dk", "dv"), captured, eager):
        if deterministic:
            cupy.testing.assert_array_equal(a.view(cupy.uint16), b.view(cupy.uint16),
                                            err_msg=name)
        else:  # dQ atomics add in arrival order
            np.testing.assert_allclose(_host64(a), _host64(b), rtol=2e-2, atol=2e-3,
                                       err_msg=name)


def test_unsupported_cases_raise_value_error():
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v, do), _ = _problem(rng, "bfloat16", 1, 2, 2, 128, 128, 64)
    kept = cupy.ones((1, 2, 2, 2), dtype=cupy.bool_)
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        backend.attention_backward(*(x.astype(cupy.float32) for x in (q, k, v, do)), kept,
                                   (64, 64), 0.125)
    q96 = cupy.zeros((1, 2, 128, 96), dtype=q.dtype)
    with pytest.raises(ValueError, match="head dim 96"):
        backend.attention_backward(q96, q96, q96, q96, kept, (64, 64), 0.125)
    with pytest.raises(ValueError, match="block"):
        backend.attention_backward(q, k, v, do, cupy.ones((1, 2, 4, 4), dtype=cupy.bool_),
                                   (32, 32), 0.125)
    with pytest.raises(ValueError, match="kept"):
        backend.attention_backward(q, k, v, do, cupy.ones((1, 2, 3, 2), dtype=cupy.bool_),
                                   (64, 64), 0.125)
    with pytest.raises(ValueError, match="grad_dtype"):
        backend.attention_backward(q, k, v, do, kept, (64, 64), 0.125, grad_dtype=np.float16)
    with pytest.raises(ValueError, match="lse"):
        backend.attention_backward(q, k, v, do, kept, (64, 64), 0.125, out=q,
                                   lse=cupy.zeros((1, 2, 100), dtype=cupy.float32))
    with pytest.raises(ValueError, match="kernel must be one of"):
        backend.attention_backward(q, k, v, do, kept, (64, 64), 0.125, kernel="wgmma")


@pytest.mark.parametrize("kernel", [True, False], ids=["list_kernel", "array_fallback"])
@pytest.mark.parametrize("nq,nk", [(3, 5), (40, 7), (1, 1), (70, 33), (97, 300)])
def test_device_lists_equal_the_plan_of_the_kept_set(nq, nk, kernel, monkeypatch):
    """The backward's list kernels (and their fallback for tile counts past the shared memory)
    give Plan.from_kept's rows and their key-major transpose, with -1 past the end, empty rows
    and columns included; partial warp chunks and several CTAs of lists a direction."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    if not kernel:
        monkeypatch.setattr(backend, "_MAX_LIST_SHARED", 0)
    rng = _fresh_rng()
    B, H = 2, 3
    kept = rng.random((B, H, nq, nk)) < 0.3
    kept[0, 0] = False                  # a head with nothing kept
    kept[1, 2, :, 0] = True             # a full column
    shape = (B, H, nq * 64, nk * 64)
    plan, col_offsets, col_indices = backend._kept_lists(cupy, cupy.asarray(kept), (64, 64),
                                                         shape)
    expected = Plan.from_kept(kept, block=(64, 64), shape=shape)
    for name, got, want in (("row_offsets", plan.row_offsets, expected.row_offsets),
                            ("row_indices", plan.row_indices, expected.row_indices),
                            ("col_offsets", col_offsets, expected.col_offsets),
                            ("col_indices", col_indices, expected.col_indices)):
        np.testing.assert_array_equal(cupy.asnumpy(got), want, err_msg=name)


def _addend(cupy, rng, shapes, layout):
    """float32 addends of ``shapes``: ``"contiguous"``; ``"padded"``: views of row-padded
    buffers (rows past N hold NaN, which must never be read); ``"strided"``: a transposed
    copy (rows not contiguous: the backend copies it)."""
    out = []
    for B, H, N, D in shapes:
        x = cupy.asarray(rng.standard_normal((B, H, N, D)).astype(np.float32))
        if layout == "padded":
            buffer = cupy.full((B, H, N + 24, D), np.nan, dtype=cupy.float32)
            buffer[:, :, :N] = x
            x = buffer[:, :, :N]
        elif layout == "strided":
            x = cupy.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        out.append(x)
    return tuple(out)


@pytest.mark.parametrize("layout", ["contiguous", "padded", "strided"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_addend_is_added_before_the_one_rounding(dtype, layout, kernel):
    """grads(addend=a) is fp32 grads + a, rounded once: in float32 bitwise the gradients plus
    ``a`` for dK/dV and the deterministic dQ (same fp32 values, one IEEE add); the reduced dQ
    starts its accumulator at ``a`` or adds it at the end (another summation order). In 16
    bits that sum within one rounding. A key tile nobody kept gets ``a``; the caller's addend
    is never written."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    B, Hq, Hkv, Nq, Nk, D, block = 1, 4, 2, 190, 130, 64, (64, 64)
    (q, k, v, do), _ = _problem(rng, dtype, B, Hq, Hkv, Nq, Nk, D)
    kept = cupy.asarray(_kept(rng, B, Hq, 3, 3, empty_column=1))
    addend = _addend(cupy, rng, ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)), layout)
    before = [a.copy() for a in addend]
    for deterministic in (False, True):
        wide = backend.attention_backward(q, k, v, do, kept, block, D ** -0.5,
                                          deterministic=deterministic, kernel=kernel)
        for grad_dtype in (None, q.dtype):
            summed = backend.attention_backward(
                q, k, v, do, kept, block, D ** -0.5, deterministic=deterministic,
                grad_dtype=grad_dtype, kernel=kernel, addend=addend)
            for index, (name, s, w, a) in enumerate(zip(("dq", "dk", "dv"), summed, wide,
                                                       addend)):
                expected = w + a
                assert s.flags.c_contiguous and s.shape == w.shape, name
                if grad_dtype is None and (index > 0 or deterministic):
                    assert s.dtype == np.float32, name
                    cupy.testing.assert_array_equal(s, expected, err_msg=name)
                else:
                    assert s.dtype == (np.float32 if grad_dtype is None else q.dtype), name
                    rounding = 8e-3 if dtype == "bfloat16" and grad_dtype is not None else 2e-3
                    np.testing.assert_allclose(_host64(s), _host64(expected), rtol=rounding,
                                               atol=1e-4, err_msg=name)
            for name, s, a in zip(("dk", "dv"), summed[1:], addend[1:]):
                # Key tile 1, kept by nobody: the addend alone (rounded once in 16 bits).
                # One rounding in 16 bits: relative, but absolute among float16's subnormals
                # (spacing 2**-24; bfloat16's start far below any addend here).
                np.testing.assert_allclose(_host64(s[:, :, 64:128]), _host64(a[:, :, 64:128]),
                                           rtol=0 if grad_dtype is None else 8e-3,
                                           atol=0 if grad_dtype is None else 2.0 ** -24,
                                           err_msg=name)
    for name, a, b in zip(("dq", "dk", "dv"), addend, before):
        cupy.testing.assert_array_equal(a, b, err_msg=f"addend {name} was written")


def test_addend_is_checked():
    import cupy

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    (q, k, v, do), _ = _problem(rng, "bfloat16", 1, 2, 2, 70, 70, 64)
    kept = cupy.ones((1, 2, 2, 2), dtype=cupy.bool_)
    good = _addend(cupy, rng, ((1, 2, 70, 64),) * 3, "contiguous")
    with pytest.raises(TypeError, match="addend"):
        backend.attention_backward(q, k, v, do, kept, (64, 64), 0.125, addend=good[:2])
    with pytest.raises(ValueError, match="addend's dk"):
        backend.attention_backward(q, k, v, do, kept, (64, 64), 0.125,
                                   addend=(good[0], good[1].astype(cupy.float16), good[2]))
    with pytest.raises(ValueError, match="addend's dv"):
        backend.attention_backward(q, k, v, do, kept, (64, 64), 0.125,
                                   addend=(good[0], good[1], good[2][:, :, :69]))


def test_default_kernel_follows_the_density_bound():
    from pysparse_attn.backends import cupy as backend

    sm90 = backend.backward_kernel_unavailable_reason("sm90") is None
    sparse = backend.SPARSE_BACKWARD_DENSITY
    assert backend.default_backward_kernel(None) == ("sm90" if sm90 else "mma_sync")
    assert backend.default_backward_kernel(1.0) == ("sm90" if sm90 else "mma_sync")
    assert backend.default_backward_kernel(sparse) == ("sm90_k64" if sm90 else "mma_sync")
    assert backend.default_backward_kernel(sparse * 1.01) == ("sm90" if sm90 else "mma_sync")


@pytest.mark.parametrize("N,rows", [(130, 192), (128, 128), (1, 64)])
def test_row_padded_copy_equals_the_slice_assignment(N, rows):
    """The kernel path of ``_row_padded`` (evenly spaced slabs) and its fallback (other
    strides, another dtype) give the rows of x, then exact zeros."""
    import cupy
    import ml_dtypes

    from pysparse_attn.backends import cupy as backend

    rng = _fresh_rng()
    x = cupy.asarray(rng.standard_normal((2, 3, N, 16)).astype(np.float32)).astype(
        ml_dtypes.bfloat16)
    sources = {"contiguous": x,
               "slab view": cupy.concatenate([x, x], axis=2)[:, :, :N],
               "bnhd view": cupy.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)}
    for label, source in sources.items():
        for dtype in (source.dtype, np.dtype(np.float32)):
            padded = backend._row_padded(cupy, source, rows, dtype)
            assert padded.shape == (2, 3, rows, 16) and padded.dtype == dtype, label
            assert padded.flags.c_contiguous, label
            cupy.testing.assert_array_equal(padded[:, :, :N].astype(cupy.float32),
                                            x.astype(cupy.float32), err_msg=label)
            assert not bool(padded[:, :, N:].astype(cupy.float32).any()), label
