"""The public API's contract on arrays: namespaces, dtypes, layouts, GQA, cross-attention,
strides, and the promise never to write into (or alias) the caller's arrays."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pysparse_attn as psa
from attention_ref import attention_ref, expand_kv
from strategies import TOLERANCES, problems

DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
BACKENDS = ["reference", "auto"]


def random_inputs(seed, shape=(2, 4, 75, 16), kv_heads=2, n_keys=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    B, H, N, D = shape
    n_keys = N if n_keys is None else n_keys
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, kv_heads, n_keys, D)).astype(dtype)
    v = rng.standard_normal((B, kv_heads, n_keys, D)).astype(dtype)
    return q, k, v


def tolerance(dtype_name, backend):
    """Output dtype's rounding; a compiled backend also accumulates in float32."""
    rtol, atol = TOLERANCES[dtype_name]
    if backend != "reference":
        rtol, atol = max(rtol, TOLERANCES["float32"][0]), max(atol, TOLERANCES["float32"][1])
    return rtol, atol


def as_float64(x):
    return np.asarray(x).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("rule", [None, psa.Recall(0.9), psa.Blasst(1e-2)])
def test_output_has_the_input_dtype_and_matches_the_oracle(dtype_name, backend, rule):
    dtype = DTYPES[dtype_name]
    q, k, v = random_inputs(1, dtype=dtype)
    out, stats = psa.attention(q, k, v, skip=rule, block=(16, 16), backend=backend,
                               return_stats=True)
    assert out.dtype == dtype and out.shape == q.shape
    # The oracle sees exactly the (rounded) inputs the library saw, over its kept set.
    expected, expected_lse = attention_ref(as_float64(q), as_float64(k), as_float64(v),
                                           tile_mask=stats.kept, block=(16, 16))
    rtol, atol = tolerance(dtype_name, backend)
    np.testing.assert_allclose(as_float64(out), expected, rtol=rtol, atol=atol)
    lse_rtol, lse_atol = tolerance("float32" if backend != "reference" else "float64", backend)
    np.testing.assert_allclose(as_float64(stats.lse), expected_lse, rtol=lse_rtol, atol=lse_atol)
    if backend == "reference":
        assert stats.lse.dtype == np.float64


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_sla_and_vjp_keep_the_input_dtype(dtype_name):
    dtype = DTYPES[dtype_name]
    q, k, v = random_inputs(2, shape=(1, 2, 50, 8), kv_heads=1, dtype=dtype)
    weight = np.eye(8, dtype=dtype)
    common = dict(critical=0.4, negligible=0.2, block=(16, 16), backend="reference")
    out = psa.sla_attention(q, k, v, proj_weight=weight, **common)
    assert out.dtype == dtype
    dq, dk, dv, dw, db = psa.sla_vjp(q, k, v, q, proj_weight=weight, **common)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    assert dw.dtype == db.dtype == np.float64  # the reference accumulates in float64
    grads = psa.attention_vjp(q, k, v, q, block=(16, 16), backend="reference")
    assert all(g.dtype == dtype for g in grads)


def test_return_stats_false_returns_only_the_output():
    q, k, v = random_inputs(3)
    out = psa.attention(q, k, v, block=(32, 32), backend="reference")
    assert isinstance(out, np.ndarray) and out.shape == q.shape
    out = psa.sla_attention(q, k, v, critical=0.5, negligible=0.0, block=(32, 32),
                            backend="reference")
    assert isinstance(out, np.ndarray) and out.shape == q.shape


def test_default_block_covers_short_sequences():
    """The default 64x64 tiles with fewer than 64 tokens: one partial tile each way."""
    q, k, v = random_inputs(4, shape=(1, 2, 37, 8), n_keys=21)
    out, stats = psa.attention(q, k, v, backend="reference", return_stats=True)
    assert stats.kept.shape == (1, 2, 1, 1)
    np.testing.assert_allclose(out, attention_ref(q, k, v)[0], *TOLERANCES["float64"])


# ---------------------------------------------------------------------------------------------
# Layouts, strides, GQA, cross-attention


@pytest.mark.parametrize("backend", BACKENDS)
def test_bnhd_layout_is_the_transposed_bhnd_call(backend):
    q, k, v = random_inputs(5)
    to_bnhd = lambda x: np.ascontiguousarray(np.swapaxes(x, 1, 2))  # noqa: E731
    options = dict(skip=psa.Recall(0.95), block=(16, 16), backend=backend, return_stats=True)
    out, stats = psa.attention(q, k, v, **options)
    out_t, stats_t = psa.attention(to_bnhd(q), to_bnhd(k), to_bnhd(v), layout="bnhd", **options)
    assert out_t.shape == (2, 75, 4, 16) and stats_t.lse.shape == (2, 75, 4)
    assert stats_t.kept.shape == stats.kept.shape  # tile bitmaps are (B, H, nq, nk) in any layout
    # A compiled backend may walk the two layouts' strides in different orders.
    rtol, atol = tolerance("float64", backend)
    np.testing.assert_allclose(np.swapaxes(out_t, 1, 2), out, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.swapaxes(stats_t.lse, 1, 2), stats.lse, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.swapaxes(stats_t.recall_bound, 1, 2), stats.recall_bound,
                               rtol=rtol, atol=atol)


def test_bnhd_layout_for_sla_vjp_block_scores_and_recall():
    q, k, v = random_inputs(6, shape=(1, 2, 40, 8))
    t = lambda x: np.ascontiguousarray(np.swapaxes(x, 1, 2))  # noqa: E731
    common = dict(block=(16, 16), backend="reference")
    sla_options = dict(critical=0.5, negligible=0.0, proj_weight=np.eye(8), **common)
    np.testing.assert_array_equal(
        np.swapaxes(psa.sla_attention(t(q), t(k), t(v), layout="bnhd", **sla_options), 1, 2),
        psa.sla_attention(q, k, v, **sla_options))
    do = np.random.default_rng(7).standard_normal(q.shape)
    grads = psa.attention_vjp(q, k, v, do, **common)
    grads_t = psa.attention_vjp(t(q), t(k), t(v), t(do), layout="bnhd", **common)
    for g, g_t in zip(grads, grads_t):
        np.testing.assert_allclose(np.swapaxes(g_t, 1, 2), g, rtol=1e-12, atol=1e-12)
    sla_grads = psa.sla_vjp(q, k, v, do, **sla_options)
    sla_grads_t = psa.sla_vjp(t(q), t(k), t(v), t(do), layout="bnhd", **sla_options)
    for g, g_t in zip(sla_grads[:3], sla_grads_t[:3]):
        np.testing.assert_allclose(np.swapaxes(g_t, 1, 2), g, rtol=1e-12, atol=1e-12)
    for g, g_t in zip(sla_grads[3:], sla_grads_t[3:]):
        np.testing.assert_allclose(g_t, g, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(psa.block_scores(t(q), t(k), layout="bnhd", block=(16, 16)),
                                  psa.block_scores(q, k, block=(16, 16)))
    kept = np.random.default_rng(8).random((1, 2, 3, 3)) < 0.5
    np.testing.assert_allclose(
        np.swapaxes(psa.recall(t(q), t(k), kept, layout="bnhd", block=(16, 16)), 1, 2),
        psa.recall(q, k, kept, block=(16, 16)), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "strided", "fortran", "negative_stride"])
def test_non_contiguous_inputs_give_the_contiguous_result(view, backend):
    q, k, v = random_inputs(9)

    def make_view(x):
        if view == "transposed":  # bhnd data stored as bnhd
            return np.swapaxes(np.ascontiguousarray(np.swapaxes(x, 1, 2)), 1, 2)
        if view == "strided":
            wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
            wide[..., ::2] = x
            return wide[..., ::2]
        if view == "fortran":
            return np.asfortranarray(x)
        return np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1]

    options = dict(skip=psa.Blasst(1e-2), block=(16, 32), backend=backend)
    rtol, atol = tolerance("float64", backend)
    np.testing.assert_allclose(psa.attention(*map(make_view, (q, k, v)), **options),
                               psa.attention(q, k, v, **options), rtol=rtol, atol=atol)


@given(problems(max_n=100, max_dim=16), st.sampled_from([None, psa.TopK(k=2)]))
def test_gqa_equals_repeated_kv_heads(problem, select):
    common = dict(select=select, block=problem.block, scale=problem.scale, backend="reference")
    H = problem.q.shape[1]
    k_full, v_full = expand_kv(problem.k, H), expand_kv(problem.v, H)
    out = psa.attention(problem.q, problem.k, problem.v, **common)
    np.testing.assert_allclose(out, psa.attention(problem.q, k_full, v_full, **common),
                               rtol=1e-12, atol=1e-12)
    do = problem.rng(1).standard_normal(problem.q.shape)
    dq, dk, dv = psa.attention_vjp(problem.q, problem.k, problem.v, do, **common)
    dq_full, dk_full, dv_full = psa.attention_vjp(problem.q, k_full, v_full, do, **common)
    group = H // problem.k.shape[1]
    summed = lambda g: g.reshape(g.shape[0], -1, group, *g.shape[2:]).sum(axis=2)  # noqa: E731
    np.testing.assert_allclose(dq, dq_full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk, summed(dk_full), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dv, summed(dv_full), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_queries, n_keys", [(1, 200), (200, 1), (17, 129), (130, 3)])
def test_cross_attention_lengths(n_queries, n_keys):
    q, k, v = random_inputs(10, shape=(1, 2, n_queries, 8), kv_heads=1, n_keys=n_keys)
    out, stats = psa.attention(q, k, v, block=(32, 16), backend="reference", return_stats=True)
    assert out.shape == q.shape and stats.kept.shape == (1, 2, -(-n_queries // 32),
                                                         -(-n_keys // 16))
    np.testing.assert_allclose(out, attention_ref(q, k, v)[0], *TOLERANCES["float64"])


# ---------------------------------------------------------------------------------------------
# The caller's arrays


def every_public_call(q, k, v, do, mask, kept, weight, bias):
    """Call every public function once with the given arrays; return everything returned."""
    block = (16, 16)
    common = dict(block=block, backend="reference")
    sla_options = dict(critical=0.4, negligible=0.2, proj_weight=weight, proj_bias=bias,
                       **common)
    results = [
        psa.attention(q, k, v, return_stats=True, **common),
        psa.attention(q, k, v, select=psa.BlockMask(mask), skip=psa.Recall(0.9),
                      return_stats=True, **common),
        psa.attention(q, k, v, select=psa.TopP(0.8), skip=psa.Cef(-5.0), return_stats=True,
                      **common),
        psa.sla_attention(q, k, v, return_stats=True, **sla_options),
        psa.attention_vjp(q, k, v, do, kept=kept, **common),
        psa.attention_vjp(q, k, v, do, select=psa.TopK(k=1), skip=psa.Blasst(0.1), **common),
        psa.sla_vjp(q, k, v, do, **sla_options),
        psa.block_scores(q, k, block=block),
        psa.recall(q, k, kept, block=block),
    ]
    flat = []
    for result in results:
        items = result if isinstance(result, tuple) else (result,)
        for item in items:
            if isinstance(item, psa.AttentionStats):
                flat += [item.lse, item.kept, item.visited, item.recall_bound, item.marginal]
            else:
                flat.append(item)
    return [x for x in flat if x is not None]


def caller_arrays(seed):
    q, k, v = random_inputs(seed, shape=(1, 4, 45, 8), kv_heads=2)
    rng = np.random.default_rng(seed + 1)
    mask = rng.random((1, 4, 3, 3)) < 0.5
    mask[..., 0] = True
    return dict(q=q, k=k, v=v, do=rng.standard_normal(q.shape), mask=mask,
                kept=mask.copy(), weight=rng.standard_normal((8, 8)),
                bias=rng.standard_normal(8))


def test_caller_arrays_are_never_written():
    arrays = caller_arrays(11)
    before = {name: x.copy() for name, x in arrays.items()}
    every_public_call(**arrays)
    for name, x in arrays.items():
        np.testing.assert_array_equal(x, before[name], err_msg=f"{name} was written")


def test_read_only_caller_arrays_are_accepted():
    arrays = caller_arrays(12)
    for x in arrays.values():
        x.setflags(write=False)
    every_public_call(**arrays)


def test_results_never_alias_the_caller_arrays():
    arrays = caller_arrays(13)
    for result in every_public_call(**arrays):
        for name, x in arrays.items():
            assert not np.shares_memory(np.asarray(result), x), f"a result aliases {name}"


def test_stats_arrays_are_fresh_between_calls():
    """Results of one call are not views of a buffer that the next call reuses."""
    q, k, v = random_inputs(14)
    first, first_stats = psa.attention(q, k, v, block=(16, 16), backend="reference",
                                       return_stats=True)
    saved, saved_lse = first.copy(), first_stats.lse.copy()
    psa.attention(q[:, :, ::-1].copy(), k, v, block=(16, 16), backend="reference",
                  return_stats=True)
    np.testing.assert_array_equal(first, saved)
    np.testing.assert_array_equal(first_stats.lse, saved_lse)


# ---------------------------------------------------------------------------------------------
# Array namespaces


def test_numpy_in_numpy_out():
    q, k, v = random_inputs(15)
    out, stats = psa.attention(q, k, v, block=(16, 16), return_stats=True)
    for x in (out, stats.lse, stats.kept, stats.visited, stats.recall_bound):
        assert type(x) is np.ndarray


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_array_api_strict_in_array_api_strict_out(dtype_name):
    xps = pytest.importorskip(
        "array_api_strict", reason="array_api_strict is not installed (it is not a "
        "dependency of the project; install it to exercise a non-NumPy namespace)")
    Array = type(xps.asarray(0.0))  # the namespace does not export its array class
    dtype = DTYPES[dtype_name]
    q, k, v = random_inputs(16, shape=(1, 2, 40, 8), kv_heads=1, dtype=dtype)
    qs, ks, vs = (xps.asarray(x) for x in (q, k, v))
    out, stats = psa.attention(qs, ks, vs, skip=psa.Recall(0.9), block=(16, 16),
                               backend="reference", return_stats=True)
    reference, _ = psa.attention(q, k, v, skip=psa.Recall(0.9), block=(16, 16),
                                 backend="reference", return_stats=True)
    assert isinstance(out, Array) and out.dtype == getattr(xps, dtype_name)
    assert isinstance(stats.lse, Array) and isinstance(stats.kept, Array)
    np.testing.assert_array_equal(np.from_dlpack(out), reference)
    grads = psa.attention_vjp(qs, ks, vs, qs, block=(16, 16), backend="reference")
    assert all(isinstance(g, Array) for g in grads)
    sla_out = psa.sla_attention(qs, ks, vs, critical=0.5, negligible=0.0, block=(16, 16),
                                backend="reference", proj_weight=np.eye(8, dtype=dtype))
    assert isinstance(sla_out, Array)
    assert isinstance(psa.block_scores(qs, ks, block=(16, 16)), Array)


def relative_l2(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# Loose on purpose: these tests check namespaces and dtypes; the GPU kernels' accuracy is
# test_gpu_backend.py's subject. Relative L2 bounds: fp32 accumulation, and P rounded to the
# 16-bit input type before P.V (bf16: 8 significant bits). float32 inputs must keep float32
# precision (docs/design.rst section 10: nothing is silently cast to a lower precision), so 1e-3.
# float32 inputs on the GPU run on bf16 tensor cores only with precision="bf16" (issue 9), so
# float32 gets the bfloat16 bound.
GPU_RELATIVE_L2 = {"float32": 3e-2, "float16": 5e-3, "bfloat16": 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(GPU_RELATIVE_L2))
def test_cupy_in_cupy_out(dtype_name):
    import cupy

    q, k, v = random_inputs(17, shape=(1, 2, 150, 64), kv_heads=1, n_keys=133,
                            dtype=DTYPES[dtype_name])
    q_d, k_d, v_d = (cupy.asarray(x) for x in (q, k, v))
    precision = "bf16" if dtype_name == "float32" else None
    out, stats = psa.attention(q_d, k_d, v_d, skip=psa.Recall(0.9), block=(64, 64),
                               return_stats=True, precision=precision)
    assert isinstance(out, cupy.ndarray) and out.dtype == q_d.dtype and out.shape == q.shape
    assert isinstance(stats.kept, cupy.ndarray) and isinstance(stats.lse, cupy.ndarray)
    expected, _ = attention_ref(as_float64(q), as_float64(k), as_float64(v),
                                tile_mask=cupy.asnumpy(stats.kept), block=(64, 64))
    assert relative_l2(as_float64(cupy.asnumpy(out)), expected) < GPU_RELATIVE_L2[dtype_name]
    grads = psa.attention_vjp(q_d, k_d, v_d, q_d, block=(64, 64), kept=stats.kept,
                              precision=precision)
    assert all(isinstance(g, cupy.ndarray) and g.dtype == q_d.dtype for g in grads)


@pytest.mark.gpu
def test_torch_cuda_in_torch_out():
    torch = pytest.importorskip("torch", reason="torch is not installed (an optional producer "
                                "of DLPack CUDA tensors, never a dependency)")
    q, k, v = random_inputs(18, shape=(1, 2, 100, 64), kv_heads=2, dtype=np.float16)
    q_t, k_t, v_t = (torch.from_numpy(x).cuda() for x in (q, k, v))
    out = psa.attention(q_t, k_t, v_t, block=(64, 64))
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float16
    expected, _ = attention_ref(as_float64(q), as_float64(k), as_float64(v))
    actual = out.cpu().numpy().astype(np.float64)
    assert relative_l2(actual, expected) < GPU_RELATIVE_L2["float16"]
    np.testing.assert_array_equal(q_t.cpu().numpy(), q)  # the caller's tensor is untouched


@pytest.mark.gpu
def test_torch_calls_run_on_the_callers_stream(monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed (an optional producer "
                                "of DLPack CUDA tensors, never a dependency)")
    import cupy

    from pysparse_attn.backends import cupy as gpu_backend

    seen = []
    forward = gpu_backend.forward

    def spy(*args, **kwargs):
        seen.append(cupy.cuda.get_current_stream().ptr)
        return forward(*args, **kwargs)

    monkeypatch.setattr(gpu_backend, "forward", spy)
    q, k, v = random_inputs(19, shape=(1, 2, 100, 64), kv_heads=2, dtype=np.float16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q_t, k_t, v_t = (torch.from_numpy(x).cuda() for x in (q, k, v))
        out = psa.attention(q_t, k_t, v_t, block=(64, 64))
    side.synchronize()
    assert seen == [side.cuda_stream], "the kernel did not run on the caller's stream"
    expected, _ = attention_ref(as_float64(q), as_float64(k), as_float64(v))
    actual = out.cpu().numpy().astype(np.float64)
    assert relative_l2(actual, expected) < GPU_RELATIVE_L2["float16"]


def test_entry_points_keep_their_signatures_and_docs():
    import inspect

    for function in (psa.attention, psa.sla_attention, psa.attention_vjp, psa.sla_vjp,
                     psa.block_scores):
        parameters = list(inspect.signature(function).parameters)
        assert parameters[:2] == ["q", "k"], function.__name__
        assert function.__doc__ and function.__doc__.strip(), function.__name__
    assert "skip" in inspect.signature(psa.attention).parameters


# ---------------------------------------------------------------------------------------------
# Precision (issue 9 item 6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_precision_bf16_rounds_the_inputs_and_keeps_the_output_dtype(backend):
    q, k, v = random_inputs(30, dtype=np.float32)
    out = psa.attention(q, k, v, block=(16, 16), backend=backend, precision="bf16")
    assert out.dtype == np.float32
    rounded = [as_float64(x.astype(ml_dtypes.bfloat16)) for x in (q, k, v)]
    expected, _ = attention_ref(*rounded)
    # Inputs rounded to bfloat16 exactly as asked; O is written in float32 (out_dtype), so the
    # rest is float32 accumulation and output rounding: float32 tolerances, not bfloat16 ones.
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    exact, _ = attention_ref(as_float64(q), as_float64(k), as_float64(v))
    assert np.abs(out - exact).max() > 1e-6, "precision='bf16' must actually round the inputs"
    grads = psa.attention_vjp(q, k, v, q, block=(16, 16), backend=backend, precision="bf16")
    assert all(g.dtype == np.float32 for g in grads)


def test_default_precision_is_the_inputs_on_the_host():
    q, k, v = random_inputs(31, dtype=np.float32)
    out = psa.attention(q, k, v, block=(16, 16), backend="cpu")
    expected, _ = attention_ref(as_float64(q), as_float64(k), as_float64(v))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_host_bfloat16_torch_tensors_are_viewed_without_a_copy():
    torch = pytest.importorskip("torch", reason="torch is not installed (an optional producer "
                                "of host bfloat16 tensors)")
    from pysparse_attn._arrays import as_backend_array

    q, k, v = random_inputs(32, shape=(1, 2, 40, 16))
    q_t, k_t, v_t = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
    view = as_backend_array("q", q_t, False)
    assert view.dtype == ml_dtypes.bfloat16 and view.ctypes.data == q_t.data_ptr()
    out = psa.attention(q_t, k_t, v_t, block=(16, 16))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    rounded = [x.float().numpy().astype(np.float64) for x in (q_t, k_t, v_t)]
    expected, _ = attention_ref(*rounded)
    np.testing.assert_allclose(out.float().numpy(), expected, rtol=2e-2, atol=2e-2)


def test_host_bfloat16_jax_arrays_are_viewed_without_a_copy():
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed (an optional producer "
                              "of host bfloat16 arrays)")
    from pysparse_attn._arrays import as_backend_array

    q, k, v = random_inputs(33, shape=(1, 2, 40, 16))
    q_j, k_j, v_j = (jnp.asarray(x, dtype=jnp.bfloat16) for x in (q, k, v))
    view = as_backend_array("q", q_j, False)
    assert view.dtype == ml_dtypes.bfloat16 and view.ctypes.data == q_j.unsafe_buffer_pointer()
    out = psa.attention(q_j, k_j, v_j, block=(16, 16))
    assert str(out.dtype) == "bfloat16" and type(out).__module__.startswith("jax")
    rounded = [np.asarray(x).astype(np.float64) for x in (q_j, k_j, v_j)]
    expected, _ = attention_ref(*rounded)
    np.testing.assert_allclose(np.asarray(out).astype(np.float64), expected, rtol=2e-2,
                               atol=2e-2)


@pytest.mark.gpu
def test_float32_on_the_gpu_needs_an_explicit_precision():
    import cupy

    q, k, v = (cupy.asarray(x) for x in random_inputs(34, shape=(1, 2, 128, 64),
                                                       dtype=np.float32))
    with pytest.raises(ValueError, match="precision"):
        psa.attention(q, k, v)
    with pytest.raises(ValueError, match="precision"):
        psa.sla_attention(q, k, v, critical=0.5, negligible=0.2)
    out = psa.attention(q, k, v, precision="bf16")
    assert out.dtype == cupy.float32


# ---------------------------------------------------------------------------------------------
# GPU calls with no host round trip, captured in CUDA graphs (issue 9 item 4). A capture fails
# on any synchronisation or device-to-host copy, so each capture test is also a no-sync test.
#
# What a user must do (docs/interop.rst): build the plan and run the call once before capture
# (NVRTC compilation, caches), keep the captured outputs (and a reused plan) alive while the
# graph lives, and capture with a CuPy memory pool that nothing else allocates from afterwards
# (the call's temporaries are freed into it during capture; a replay writes them again).


def _graph_inputs(cupy, seed=40):
    q, k, v = random_inputs(seed, shape=(1, 4, 64 * 5 + 17, 64), kv_heads=2,
                            dtype=ml_dtypes.bfloat16)
    return tuple(cupy.asarray(x) for x in (q, k, v))


def _capture_cases():
    return {
        "topk": lambda q, k, v, p: psa.attention(q, k, v, select=psa.TopK(k=2)),
        "topk_peak_recall": lambda q, k, v, p: psa.attention(q, k, v, select=psa.TopK(k=3),
                                                             skip=psa.Recall(0.9)),
        "reused_plan": lambda q, k, v, p: psa.attention(q, k, v, plan=p),
        "dense": lambda q, k, v, p: psa.attention(q, k, v),
        "blockmask": lambda q, k, v, p: psa.attention(q, k, v,
                                                      select=psa.BlockMask(p.visit_bitmap())),
        "topp_stats": lambda q, k, v, p: psa.attention(q, k, v, select=psa.TopP(0.8),
                                                       return_stats=True)[0],
        "sla": lambda q, k, v, p: psa.sla_attention(q, k, v, critical=0.4, negligible=0.2),
        "sla_stats": lambda q, k, v, p: psa.sla_attention(q, k, v, critical=0.4, negligible=0.2,
                                                          return_stats=True)[1].lse,
        "plan_topp": lambda q, k, v, p: psa.plan(q, k, select=psa.TopP(0.8),
                                                 order="peak").row_indices,
    }


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(_capture_cases()))
def test_cupy_graph_replay_equals_the_eager_call(case):
    import cupy

    call = _capture_cases()[case]
    q, k, v = _graph_inputs(cupy)
    plan = psa.plan(q, k, select=psa.TopK(k=2))
    eager = call(q, k, v, plan)
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        call(q, k, v, plan)  # warm the private pool with this call's allocations
        stream.synchronize()
        stream.begin_capture()
        captured = call(q, k, v, plan)
        graph = stream.end_capture()
    # Bitwise comparisons through a byte view (bfloat16 has no CuPy ufuncs of its own); the
    # kernels are deterministic, so a replay must reproduce the eager bytes exactly.
    captured.view(cupy.uint8).fill(0)
    graph.launch(stream)
    stream.synchronize()
    cupy.testing.assert_array_equal(captured.view(cupy.uint8), eager.view(cupy.uint8))
    graph.launch(stream)  # a second replay gives the same again
    stream.synchronize()
    cupy.testing.assert_array_equal(captured.view(cupy.uint8), eager.view(cupy.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["topk", "reused_plan", "dense"])
def test_torch_graph_replay_equals_the_eager_call(case):
    torch = pytest.importorskip("torch", reason="torch is not installed (torch.cuda.graph is "
                                "one of the two capture paths tested)")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here (a CPU-only build)")
    import cupy

    call = _capture_cases()[case]
    q_t, k_t, v_t = (torch.randn(1, 4, 64 * 5 + 17, 64, device="cuda", dtype=torch.bfloat16)
                     for _ in range(3))
    k_t, v_t = k_t[:, :2].contiguous(), v_t[:, :2].contiguous()
    plan = psa.plan(q_t, k_t, select=psa.TopK(k=2))
    eager = call(q_t, k_t, v_t, plan)
    pool = cupy.cuda.MemoryPool()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with cupy.cuda.using_allocator(pool.malloc):
        with torch.cuda.stream(side):
            call(q_t, k_t, v_t, plan)  # warm-up on the capture's side stream
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # CuPy's pool keeps free blocks per stream and the warm-up ran on another stream, so
        # the capture may cudaMalloc new blocks: "relaxed" lets it (the blocks stay in `pool`).
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            captured = call(q_t, k_t, v_t, plan)
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
