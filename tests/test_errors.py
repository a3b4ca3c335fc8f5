"""Every error of docs/design.rst section 10: the exception type, and a message naming the argument."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import pysparse_attn as psa

B, H, N, D = 1, 2, 40, 8
BLOCK = (16, 16)
NQ = NK = math.ceil(N / 16)


def arrays(seed=0, shape=(B, H, N, D)):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape) for _ in range(3))


def names(*words):
    """A regex that matches a message naming any of ``words`` as a whole word."""
    return "|".join(rf"(?<![\w.]){re.escape(word)}(?!\w)" for word in words)


def call_attention(q=None, k=None, v=None, **options):
    base = arrays()
    q = base[0] if q is None else q
    k = base[1] if k is None else k
    v = base[2] if v is None else v
    options.setdefault("block", BLOCK)
    options.setdefault("backend", "reference")
    return psa.attention(q, k, v, **options)


def call_sla(q=None, k=None, v=None, **options):
    base = arrays()
    q = base[0] if q is None else q
    k = base[1] if k is None else k
    v = base[2] if v is None else v
    options.setdefault("critical", 0.5)
    options.setdefault("negligible", 0.2)
    options.setdefault("block", BLOCK)
    options.setdefault("backend", "reference")
    return psa.sla_attention(q, k, v, **options)


# ---------------------------------------------------------------------------------------------
# Shapes and layouts


@pytest.mark.parametrize("argument, bad, error", [
    ("q", np.zeros((B, N, D)), ValueError),            # 3-D
    ("k", np.zeros((B, H, N, D, 1)), ValueError),      # 5-D
    ("v", np.zeros((B, H, N + 1, D)), ValueError),     # v not shaped like k
    ("k", np.zeros((B, H, N, D + 1)), ValueError),     # head dims differ
    ("k", np.zeros((B + 1, H, N, D)), ValueError),     # batches differ
    ("v", np.zeros((B, H, N, D + 2)), ValueError),     # v head dim
], ids=["q-3d", "k-5d", "v-length", "k-head-dim", "k-batch", "v-head-dim"])
def test_shape_mismatch_names_the_argument(argument, bad, error):
    with pytest.raises(error, match=names(argument)):
        call_attention(**{argument: bad})


def test_heads_that_are_not_a_gqa_multiple():
    q, _, _ = arrays(shape=(B, 3, N, D))
    _, k, v = arrays(shape=(B, 2, N, D))
    with pytest.raises(ValueError, match=names("k", "heads")):
        call_attention(q, k, v)


def test_fewer_query_heads_than_kv_heads():
    q, _, _ = arrays(shape=(B, 2, N, D))
    _, k, v = arrays(shape=(B, 4, N, D))
    with pytest.raises(ValueError, match=names("k", "heads")):
        call_attention(q, k, v)


def test_bnhd_layout_mismatch():
    # bnhd: q has 3 heads and k, v have 2 on axis 2; read as bhnd they would have matched.
    q, _, _ = arrays(shape=(B, N, 3, D))
    _, k, v = arrays(shape=(B, N, 2, D))
    with pytest.raises(ValueError, match=names("k", "heads")):
        call_attention(q, k, v, layout="bnhd")


@pytest.mark.parametrize("layout", ["BHND", "nhd", "", None, "bhdn"])
def test_unknown_layout(layout):
    with pytest.raises(ValueError, match=names("layout")):
        call_attention(layout=layout)


@pytest.mark.parametrize("argument, shape", [
    ("q", (B, H, 0, D)), ("q", (0, H, N, D)), ("q", (B, 0, N, D)), ("q", (B, H, N, 0)),
    ("k", (B, H, 0, D)),
])
def test_empty_sequences(argument, shape):
    q, k, v = arrays()
    if argument == "q":
        q = np.zeros(shape)
    else:
        k = v = np.zeros(shape)
    with pytest.raises(ValueError, match=names(argument)):
        call_attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# Dtypes, namespaces, devices


@pytest.mark.parametrize("argument", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex128, np.bool_, np.uint8])
def test_wrong_dtype(argument, dtype):
    bad = np.ones((B, H, N, D), dtype=dtype)
    with pytest.raises(TypeError, match=names(argument)):
        call_attention(**{argument: bad})


@pytest.mark.parametrize("argument", ["k", "v"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_mixed_dtypes_are_refused_not_cast(argument, dtype):
    bad = arrays()[1].astype(dtype)
    with pytest.raises(TypeError, match=names(argument)):
        call_attention(**{argument: bad})


@pytest.mark.parametrize("argument", ["q", "k", "v"])
def test_non_array_input(argument):
    with pytest.raises(TypeError, match=names(argument)):
        call_attention(**{argument: "not an array"})


def test_no_argument_is_an_array():
    with pytest.raises(TypeError, match=names("q")):
        call_attention("q", "k", "v")


def test_mixed_namespaces():
    xps = pytest.importorskip(
        "array_api_strict", reason="a second array namespace (array_api_strict) is not "
        "installed; it is not a dependency of the project")
    q, k, v = arrays()
    with pytest.raises(TypeError, match=names("k")):
        call_attention(q, xps.asarray(k), v)


@pytest.mark.gpu
def test_mixed_devices():
    import cupy

    q, k, v = arrays()
    with pytest.raises(ValueError, match=names("k", "q")):
        psa.attention(cupy.asarray(q), k, cupy.asarray(v), block=(64, 64))


# ---------------------------------------------------------------------------------------------
# NaN and infinity


@pytest.mark.parametrize("argument", ["q", "k", "v"])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_rejected(argument, poison):
    base = dict(zip("qkv", arrays()))
    bad = base[argument].copy()
    bad[0, 1, 17, 3] = poison
    with pytest.raises(ValueError, match=names(argument)):
        call_attention(**{argument: bad})


def test_finite_inputs_with_an_overflowing_sum_are_accepted():
    """The cheap check sums the input; a sum that overflows must not be a false alarm."""
    q, k, v = arrays()
    v = v.copy()
    v[0, 0, :, :] = 1e308
    out = call_attention(v=v)
    assert np.isfinite(out[0, 1]).all()


def test_check_finite_false_propagates_nan():
    q, k, v = arrays()
    v = v.copy()
    v[0, 0, 5, 2] = np.nan
    out = call_attention(v=v, check_finite=False)
    # Every query of head 0 attends to key 5 (dense): column 2 of each row is NaN.
    assert np.isnan(out[0, 0, :, 2]).all()
    assert np.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("argument, shape", [("proj_weight", (D, D)), ("proj_bias", (D,))])
def test_non_finite_projection(argument, shape):
    bad = np.ones(shape)
    bad[(0,) * len(shape)] = np.nan
    options = {"proj_weight": np.ones((D, D))}
    options[argument] = bad
    with pytest.raises(ValueError, match=names(argument)):
        call_sla(**options)


# ---------------------------------------------------------------------------------------------
# Thresholds of rules and selectors


@pytest.mark.parametrize("make, argument, error", [
    (lambda: psa.Recall(0.0), "target", ValueError),
    (lambda: psa.Recall(-0.5), "target", ValueError),
    (lambda: psa.Recall(1.0000001), "target", ValueError),
    (lambda: psa.Recall(float("nan")), "target", ValueError),
    (lambda: psa.Recall(float("inf")), "target", ValueError),
    (lambda: psa.Recall("0.9"), "target", TypeError),
    (lambda: psa.Recall(True), "target", TypeError),
    (lambda: psa.Recall(0.9, exact=1), "exact", TypeError),
    (lambda: psa.TopK(k=0), "k", ValueError),
    (lambda: psa.TopK(k=-3), "k", ValueError),
    (lambda: psa.TopK(k=2.5), "k", TypeError),
    (lambda: psa.TopK(ratio=0.0), "ratio", ValueError),
    (lambda: psa.TopK(ratio=1.5), "ratio", ValueError),
    (lambda: psa.TopK(ratio=float("nan")), "ratio", ValueError),
    (lambda: psa.TopK(), "k", ValueError),
    (lambda: psa.TopK(k=2, ratio=0.5), "ratio", ValueError),
    (lambda: psa.TopP(0.0), "p", ValueError),
    (lambda: psa.TopP(1.01), "p", ValueError),
    (lambda: psa.TopP(-1.0), "p", ValueError),
    (lambda: psa.TopP(float("nan")), "p", ValueError),
    (lambda: psa.TopP("high"), "p", TypeError),
    (lambda: psa.Blasst(0.0), "lam", ValueError),
    (lambda: psa.Blasst(1.5), "lam", ValueError),
    (lambda: psa.Blasst(-1e-3), "lam", ValueError),
    (lambda: psa.Blasst(None), "lam", TypeError),
    (lambda: psa.Cef(0.5), "lam", ValueError),
    (lambda: psa.Cef(float("-inf")), "lam", ValueError),
    (lambda: psa.Cef.from_mass(0.0, 64, 1000), "p", ValueError),
    (lambda: psa.Cef.from_mass(1.5, 64, 1000), "p", ValueError),
    (lambda: psa.Cef.from_mass(0.1, 0, 1000), "block_k", ValueError),
    (lambda: psa.Cef.from_mass(0.1, 64, 0), "n_keys", ValueError),
])
def test_thresholds_out_of_range(make, argument, error):
    with pytest.raises(error, match=names(argument)):
        make()


@pytest.mark.parametrize("options, argument, error", [
    (dict(critical=0.0), "critical", ValueError),
    (dict(critical=1.5), "critical", ValueError),
    (dict(critical="half"), "critical", TypeError),
    (dict(negligible=1.0), "negligible", ValueError),
    (dict(negligible=-0.1), "negligible", ValueError),
    (dict(negligible=float("nan")), "negligible", ValueError),
    (dict(linear="dense"), "linear", ValueError),
    (dict(feature_map="tanh"), "feature_map", ValueError),
    (dict(eps=-1e-3), "eps", ValueError),
    (dict(eps=float("nan")), "eps", ValueError),
    (dict(eps="small"), "eps", TypeError),
    (dict(proj_weight=np.zeros((D, D + 1))), "proj_weight", ValueError),
    (dict(proj_weight=np.zeros(D)), "proj_weight", ValueError),
    (dict(proj_weight=np.zeros((D, D), dtype=np.int64)), "proj_weight", TypeError),
    (dict(proj_bias=np.zeros(D + 1)), "proj_bias", ValueError),
    (dict(proj_bias=np.zeros((1, D))), "proj_bias", ValueError),
])
def test_sla_options(options, argument, error):
    with pytest.raises(error, match=names(argument)):
        call_sla(**options)


# ---------------------------------------------------------------------------------------------
# Call options


@pytest.mark.parametrize("options, argument, error", [
    (dict(block=(0, 16)), "block", ValueError),
    (dict(block=(16, -16)), "block", ValueError),
    (dict(block=(16,)), "block", TypeError),
    (dict(block=16), "block", TypeError),
    (dict(block=(16.0, 16)), "block", TypeError),
    (dict(block=(True, 16)), "block", TypeError),
    (dict(scale=0.0), "scale", ValueError),
    (dict(scale=-0.5), "scale", ValueError),
    (dict(scale=float("nan")), "scale", ValueError),
    (dict(scale=float("inf")), "scale", ValueError),
    (dict(scale="0.1"), "scale", TypeError),
    (dict(order="random"), "order", ValueError),
    (dict(order="peak", peak=-1), "peak", ValueError),
    (dict(order="peak", peak=1.5), "peak", ValueError),
    (dict(select="topk"), "select", TypeError),
    (dict(select=psa.Recall(0.9)), "select", TypeError),
    (dict(skip="recall"), "skip", TypeError),
    (dict(skip=psa.TopK(k=1)), "skip", TypeError),
    (dict(backend="gpu"), "backend", ValueError),
    (dict(backend=3), "backend", TypeError),
    (dict(threads=0), "threads", ValueError),
])
def test_attention_options(options, argument, error):
    with pytest.raises(error, match=names(argument)):
        call_attention(**options)


@pytest.mark.parametrize("mask, error", [
    (np.ones((NQ, NK + 1), dtype=bool), ValueError),             # does not broadcast
    (np.ones((B, H + 1, NQ, NK), dtype=bool), ValueError),
    (np.ones((NQ, NK), dtype=np.float64), TypeError),            # not bool
    (np.array([[True, False, False], [False] * 3, [True] * 3]), ValueError),  # empty tile row
], ids=["too-many-key-tiles", "too-many-heads", "float-mask", "query-tile-keeps-nothing"])
def test_block_mask(mask, error):
    with pytest.raises(error, match=names("mask")):
        call_attention(select=psa.BlockMask(mask))


def test_cupy_backend_without_cupy_or_gpu():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a CUDA device is present: backend='cupy' is available here")
    except Exception:
        pass  # no CuPy, or no CUDA runtime: exactly the case under test
    with pytest.raises(ValueError, match=names("cupy", "backend")):
        call_attention(backend="cupy")


@pytest.mark.gpu
def test_gpu_block_sizes_not_supported_lists_the_supported_ones():
    import cupy

    q, k, v = (cupy.asarray(x, dtype=cupy.float16) for x in arrays())
    with pytest.raises(ValueError, match=names("block")) as raised:
        psa.attention(q, k, v, block=(7, 13), backend="cupy")
    assert "supported" in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Oracles and gradients


@pytest.mark.parametrize("kept, error", [
    (np.ones((B, H, NQ, NK + 1), dtype=bool), ValueError),
    (np.ones((B, H, NQ, NK), dtype=np.int8), ValueError),
], ids=["wrong-shape", "not-bool"])
def test_recall_kept(kept, error):
    q, k, _ = arrays()
    with pytest.raises((ValueError, TypeError), match=names("kept")):
        psa.recall(q, k, kept, block=BLOCK)


@pytest.mark.parametrize("do", [
    np.zeros((B, H, N + 1, D)),          # wrong shape
    np.zeros((B, H, N, D), np.float32),  # wrong dtype
    np.zeros((H, N, D)),                 # wrong rank
    "gradient",                          # not an array
    np.full((B, H, N, D), np.nan),       # not finite
], ids=["wrong-shape", "wrong-dtype", "wrong-rank", "not-an-array", "not-finite"])
@pytest.mark.parametrize("vjp", ["attention", "sla"])
def test_vjp_cotangent(do, vjp):
    q, k, v = arrays()
    with pytest.raises((ValueError, TypeError), match=names("do")):
        if vjp == "attention":
            psa.attention_vjp(q, k, v, do, block=BLOCK, backend="reference")
        else:
            psa.sla_vjp(q, k, v, do, critical=0.5, negligible=0.0, block=BLOCK,
                        backend="reference")


@pytest.mark.parametrize("kept", [
    np.ones((B, H, NQ + 1, NK), dtype=bool),
    np.ones((B, H, NQ, NK), dtype=np.float64),
    np.zeros((B, H, NQ, NK), dtype=bool),  # a query tile with no kept tile
], ids=["wrong-shape", "not-bool", "query-tile-keeps-nothing"])
def test_vjp_kept(kept):
    q, k, v = arrays()
    with pytest.raises((ValueError, TypeError), match=names("kept")):
        psa.attention_vjp(q, k, v, q, kept=kept, block=BLOCK, backend="reference")


def _forward_saved(vjp, layout="bhnd"):
    q, k, v = arrays()
    if layout == "bnhd":
        q, k, v = (np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in (q, k, v))
    if vjp == "attention":
        options = dict(block=BLOCK, backend="reference", layout=layout)
        out, stats = psa.attention(q, k, v, return_stats=True, **options)
        function = psa.attention_vjp
    else:
        options = dict(critical=0.5, negligible=0.0, block=BLOCK, backend="reference",
                       layout=layout)
        out, stats = psa.sla_attention(q, k, v, return_stats=True, **options)
        function = psa.sla_vjp
    return (q, k, v), out, stats, function, options


def _torch_or_skip():
    return pytest.importorskip("torch", reason="the namespace check needs a second array "
                               "library (torch)")


@pytest.mark.parametrize("case", [
    "wrong-shape", "wrong-dtype", "wrong-rank", "not-an-array", "not-finite", "other-namespace",
])
@pytest.mark.parametrize("vjp", ["attention", "sla"])
def test_vjp_saved_output(case, vjp):
    (q, k, v), out, stats, function, options = _forward_saved(vjp)
    bad = {
        "wrong-shape": lambda: out[:, :, :-1],
        "wrong-dtype": lambda: out.astype(np.float32),
        "wrong-rank": lambda: out[0],
        "not-an-array": lambda: "output",
        "not-finite": lambda: np.full_like(out, np.nan),
        "other-namespace": lambda: _torch_or_skip().from_numpy(np.ascontiguousarray(out)),
    }[case]()
    with pytest.raises((ValueError, TypeError), match=names("out")):
        function(q, k, v, q, kept=stats.kept, out=bad, lse=stats.lse, **options)


@pytest.mark.parametrize("case, error", [
    ("wrong-shape", ValueError), ("wrong-dtype", TypeError), ("integer", TypeError),
    ("not-finite", ValueError), ("canonical-for-bnhd", ValueError), ("not-an-array", TypeError),
])
@pytest.mark.parametrize("vjp", ["attention", "sla"])
def test_vjp_saved_lse(case, error, vjp):
    layout = "bnhd" if case == "canonical-for-bnhd" else "bhnd"
    (q, k, v), out, stats, function, options = _forward_saved(vjp, layout)
    lse = np.asarray(stats.lse)
    bad = {
        "wrong-shape": lse[..., :-1],
        "wrong-dtype": lse.astype(np.float16),
        "integer": lse.astype(np.int64),
        "not-finite": np.full_like(lse, -np.inf),
        # stats.lse of a bnhd call is (B, Nq, H): the (B, H, Nq) order is rejected, not guessed
        "canonical-for-bnhd": np.ascontiguousarray(np.swapaxes(lse, 1, 2)),
        "not-an-array": "lse",
    }[case]
    with pytest.raises(error, match=names("lse")):
        function(q, k, v, q, kept=stats.kept, out=out, lse=bad, **options)


@pytest.mark.parametrize("given", ["out", "lse"])
@pytest.mark.parametrize("vjp", ["attention", "sla"])
def test_vjp_saved_tensors_need_kept(given, vjp):
    (q, k, v), out, stats, function, options = _forward_saved(vjp)
    saved = {"out": out, "lse": stats.lse}
    with pytest.raises(ValueError, match=names(given)) as raised:
        function(q, k, v, q, **{given: saved[given]}, **options)
    assert "kept" in str(raised.value)


@pytest.mark.parametrize("vjp", ["attention", "sla"])
def test_vjp_deterministic_must_be_a_bool(vjp):
    (q, k, v), _, stats, function, options = _forward_saved(vjp)
    with pytest.raises(TypeError, match=names("deterministic")):
        function(q, k, v, q, kept=stats.kept, deterministic="yes", **options)


def test_block_scores_errors():
    q, k, _ = arrays()
    with pytest.raises(ValueError, match=names("q")):
        psa.block_scores(q[0], k, block=BLOCK)
    with pytest.raises(ValueError, match=names("layout")):
        psa.block_scores(q, k, block=BLOCK, layout="nbhd")
    with pytest.raises(ValueError, match=names("block")):
        psa.block_scores(q, k, block=(0, 8))


# ---------------------------------------------------------------------------------------------
# Flags, precision and plan arguments


@pytest.mark.parametrize("flag", ["return_stats", "check_finite"])
@pytest.mark.parametrize("value", [1, "yes", np.array(True)])
def test_non_bool_flags_are_a_type_error(flag, value):
    with pytest.raises(TypeError, match=names(flag)):
        call_attention(**{flag: value})
    with pytest.raises(TypeError, match=names(flag)):
        call_sla(**{flag: value})


def test_numpy_bools_are_accepted_as_flags():
    out, stats = call_attention(return_stats=np.bool_(True), check_finite=np.bool_(False))
    assert stats.kept.dtype == bool and out.shape == (B, H, N, D)


@pytest.mark.parametrize("precision", ["fp8", "bfloat16", True])
def test_unknown_precision(precision):
    with pytest.raises(ValueError, match=names("precision")):
        call_attention(precision=precision)


def test_check_finite_defaults_to_on_for_host_arrays():
    q, k, v = arrays()
    v = v.copy()
    v[0, 0, 5, 2] = np.inf
    with pytest.raises(ValueError, match=names("v")):
        call_attention(v=v)
