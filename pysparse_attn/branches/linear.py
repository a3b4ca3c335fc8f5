"""SLA's linear branch, its merge with the sparse output, and the projection's gradients.

The math (docs/design.rst section 6), per (batch, query head) and query tile ``I``::

    H_J = phi(K_J)^T V_J,  Z_J = phi(K_J)^T 1                   per key tile J
    H_I = sum_{J marginal for I} H_J,  Z_I = sum ... Z_J        one GEMM of the 0/1 marginal
                                                                matrix with the tile states
    O_l,i = phi(q_i) H_I / (phi(q_i) . Z_I + eps)               0 without a marginal tile, or
                                                                where the denominator is 0
    O = O_s + O_l W^T + b

``linear="marginal"`` and ``"complement"`` differ only in the marginal set the plan holds;
``"global"`` marks every tile, so ``H_I`` is one state per head. ``H_I`` can be formed directly
(``method="direct"``) or as the all-tiles total minus the non-marginal tiles
(``"total_minus_rest"``); both agree in float64 (tests/test_sla.py), the direct sum has no
cancellation and, as a GEMM, costs the same for any density, so the backends use it.

Each public function here is the one definition of its piece, written against the array API
shared by NumPy and CuPy, and each has a backend hook that a backend module may provide
(``docs/internals.rst``): :func:`linear_branch` -> ``backend.linear_branch``,
:func:`sla_output` -> ``backend.sla_merge`` (optional, fused), :func:`linear_vjp` ->
``backend.linear_branch`` and ``backend.linear_backward``. The reference backend's hooks are
the functions of this module in float64; the API in ``_api.py`` only orchestrates.

Cost at the Wan2.1-1.3B shape (bf16, B=1, H=12, N=32,760, D=128, 128x64 tiles: nq=256, nk=512)
of the CUDA path (``backends/cupy.py``), one (N, D) bf16 tensor of all heads being 100.7 MB:

=============================================  ===============  ==============================
stage                                          GFLOP            bytes moved (MB)
=============================================  ===============  ==============================
phi(K) and Z_J (one pass)                      --               read 101, write 101
H_J = phi(K_J)^T V_J (batched GEMM, bf16)      12.9             read 201, write 201
H_I = M H_J (one GEMM, bf16 out), Z_I (fp32)   51.5 + 0.4       read >= 201, write 101
phi(q) / denominator (one pass)                --               read 101, write 101
O_l = (phi(q)/den) H_I (batched GEMM, fp32)    12.9             read 201, write 201
Y = O_l W^T (one GEMM, TF32, fp32 out)         12.9             read 201, write 201
out = O_s + Y + b (one pass)                   --               read 403, write 101
=============================================  ===============  ==============================

About 91 GFLOP on tensor cores and 2.4 GB of traffic: memory-bound, ~0.56 ms at the measured
4.3 TB/s copy rate (not yet timed on a GPU). ``linear="global"`` needs no tile states: H =
phi(K)^T V per head (12.9 GFLOP), W folded into that D x D state in float32, no Y pass: ~1.4 GB.
The largest remaining items, the tile states (402 MB written and read) and the float32 O_l / Y
round trips (800 MB), are what a fused kernel would save (phi computed in the GEMM's loads, W
and the merge applied in the epilogue of the O_l product), for ~1.2 GB and ~0.3 ms.
"""

from __future__ import annotations

import numpy as np

from .feature_maps import check_feature_map, feature_map, feature_map_vjp

__all__ = [
    "MODES",
    "METHODS",
    "accumulator",
    "linear_attention",
    "linear_attention_vjp",
    "key_tile_states",
    "query_tile_states",
    "merge",
    "projection_grads",
    "linear_branch",
    "sla_output",
    "sparse_output",
    "linear_vjp",
]

MODES = ("marginal", "complement", "global")
METHODS = ("direct", "total_minus_rest")


def _namespace(x):
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def accumulator(xp, dtype, exact=False):
    """float64 for float64 inputs or ``exact`` (the reference), float32 otherwise."""
    return xp.float64 if exact or dtype == xp.float64 else xp.float32


def _tiles(xp, x, block):
    """``(B, H, N, D)`` -> zero-padded ``(B, H, n_tiles, block, D)``."""
    B, H, N, D = x.shape
    n = -(-N // block)
    if n * block != N:
        x = xp.concatenate([x, xp.zeros((B, H, n * block - N, D), dtype=x.dtype)], axis=2)
    return x.reshape(B, H, n, block, D)


def _untile(x, n):
    B, H, n_tiles, block, D = x.shape
    return x.reshape(B, H, n_tiles * block, D)[:, :, :n]


def key_tile_states(xp, phi_k, v, block_k):
    """Per key tile: ``H_J = phi(K_J)^T V_J`` ``(B, Hkv, nk, D, Dv)`` and ``Z_J = phi(K_J)^T 1``
    ``(B, Hkv, nk, D)``.

    ``phi_k`` is zero-padded, so the partial last tile sums its valid keys only.
    """
    phi_tiles = _tiles(xp, phi_k, block_k)
    return xp.matmul(xp.swapaxes(phi_tiles, -1, -2), _tiles(xp, v, block_k)), phi_tiles.sum(axis=3)


def query_tile_states(xp, tile_h, tile_z, marginal, method="direct"):
    """``H_I`` ``(B, Hq, nq, D, Dv)`` and ``Z_I`` ``(B, Hq, nq, D)`` over each marginal set.

    One GEMM per kv head of the 0/1 matrix (the group's query heads stacked) with the tile
    states; ``method="total_minus_rest"`` subtracts the non-marginal tiles from the total.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    B, Hkv, nk, D, Dv = tile_h.shape
    Hq, nq = marginal.shape[1], marginal.shape[2]
    weights = xp.asarray(marginal).astype(tile_h.dtype).reshape(B, Hkv, (Hq // Hkv) * nq, nk)
    flat_h = tile_h.reshape(B, Hkv, nk, D * Dv)
    if method == "direct":
        h, z = weights @ flat_h, weights @ tile_z
    else:
        rest = 1 - weights
        h = flat_h.sum(axis=2, keepdims=True) - rest @ flat_h
        z = tile_z.sum(axis=2, keepdims=True) - rest @ tile_z
    return h.reshape(B, Hq, nq, D, Dv), z.reshape(B, Hq, nq, D)


def _forward_parts(xp, q, k, v, marginal, block, name, eps, method, dtype):
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    phi_q, phi_k = feature_map(q, name, xp), feature_map(k, name, xp)
    tile_h, tile_z = key_tile_states(xp, phi_k, v, block[1])
    marginal = xp.asarray(marginal)
    h, z = query_tile_states(xp, tile_h, tile_z, marginal, method)
    phi_q_tiles = _tiles(xp, phi_q, block[0])                       # (B, Hq, nq, Bq, D)
    numerator = phi_q_tiles @ h                                     # (B, Hq, nq, Bq, Dv)
    denominator = (phi_q_tiles @ z[..., None])[..., 0] + eps        # (B, Hq, nq, Bq)
    # Without a marginal tile O_l is 0 by definition (total minus rest leaves rounding there).
    usable = marginal.any(axis=-1)[..., None] & (denominator != 0)
    safe = xp.where(usable, denominator, 1)
    return dict(q=q, k=k, v=v, phi_q=phi_q, phi_k=phi_k, h=h, z=z, phi_q_tiles=phi_q_tiles,
                numerator=numerator, usable=usable, safe=safe, weights=marginal)


def linear_attention(xp, q, k, v, marginal, block, name="softmax", eps=0.0, method="direct",
                     dtype=None):
    """``O_l`` ``(B, Hq, Nq, Dv)`` in ``dtype`` (default: :func:`accumulator` of ``q``).

    Parameters
    ----------
    xp : module
        NumPy or CuPy, the namespace of every array argument.
    q : array ``(B, Hq, Nq, D)``
    k, v : array ``(B, Hkv, Nk, D)``
    marginal : bool array ``(B, Hq, nq, nk)``
    block : (int, int)
    name : {"softmax", "elu1", "relu"}
    eps : float
    method : {"direct", "total_minus_rest"}
    dtype : dtype, optional
    """
    check_feature_map(name)
    dtype = dtype or accumulator(xp, q.dtype)
    parts = _forward_parts(xp, q, k, v, marginal, block, name, eps, method, dtype)
    out = xp.where(parts["usable"][..., None], parts["numerator"] / parts["safe"][..., None], 0)
    return _untile(out, q.shape[2]).astype(dtype, copy=False)


def linear_attention_vjp(xp, q, k, v, marginal, block, name, eps, d_out, dtype=None):
    """Gradients ``(dq, dk, dv)`` of :func:`linear_attention` given ``d_out = dL/dO_l``.

    Per query tile ``dH_I = phi(Q_I)^T dnum`` and ``dZ_I``; each key tile receives the sum over
    the query tiles (and GQA heads) that mark it marginal, as one GEMM of the transposed 0/1
    matrix. ``dk``/``dv`` are summed over each GQA group; all in ``dtype``.
    """
    check_feature_map(name)
    dtype = dtype or accumulator(xp, q.dtype)
    p = _forward_parts(xp, q, k, v, marginal, block, name, eps, "direct", dtype)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nq = p["h"].shape[2]
    Dv = v.shape[-1]
    g = _tiles(xp, d_out.astype(dtype), block[0])                   # (B, Hq, nq, Bq, Dv)
    safe, usable = p["safe"], p["usable"]
    out = p["numerator"] / safe[..., None]
    d_num = xp.where(usable[..., None], g / safe[..., None], 0)
    d_den = xp.where(usable, -(g * out).sum(axis=-1) / safe, 0)
    d_phi_q = d_num @ xp.swapaxes(p["h"], -1, -2) + d_den[..., None] * p["z"][:, :, :, None, :]
    dq = feature_map_vjp(p["q"], p["phi_q"], name, _untile(d_phi_q, Nq), xp)

    phi_q_t = xp.swapaxes(p["phi_q_tiles"], -1, -2)                 # (B, Hq, nq, D, Bq)
    d_h = (phi_q_t @ d_num).reshape(B, Hkv, (Hq // Hkv) * nq, D * Dv)
    d_z = (phi_q_t @ d_den[..., None])[..., 0].reshape(B, Hkv, (Hq // Hkv) * nq, D)
    to_keys = xp.swapaxes(p["weights"].astype(dtype).reshape(B, Hkv, -1, p["weights"].shape[-1]),
                          -1, -2)                                   # (B, Hkv, nk, group * nq)
    d_tile_h = (to_keys @ d_h).reshape(B, Hkv, -1, D, Dv)
    d_tile_z = to_keys @ d_z                                        # (B, Hkv, nk, D)
    phi_k_tiles = _tiles(xp, p["phi_k"], block[1])
    dv = _untile(phi_k_tiles @ d_tile_h, Nk)
    d_phi_k = _tiles(xp, p["v"], block[1]) @ xp.swapaxes(d_tile_h, -1, -2) \
        + d_tile_z[:, :, :, None, :]
    dk = feature_map_vjp(p["k"], p["phi_k"], name, _untile(d_phi_k, Nk), xp)
    return dq, dk, dv


def _rows_times(matmul, x, w):
    """``x @ w`` for ``x`` of shape ``(..., k)`` by a 2-D ``matmul`` over its rows."""
    return matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def _matmul_of(backend, xp, options):
    """The 2-D product the branch functions use: the backend's ``matmul`` hook for the float
    dtypes it takes (the CPU's, which keeps NumPy's BLAS threads off the kernels' cores), else
    ``xp.matmul``."""
    hook = getattr(backend, "matmul", None)
    if hook is None:
        return xp.matmul
    threads = options.get("threads")

    def matmul(a, b):
        if a.dtype == b.dtype and a.dtype in (np.float32, np.float64):
            return hook(a, b, threads=threads)
        return xp.matmul(a, b)
    return matmul


def merge(xp, o_sparse, o_linear, weight, bias, out_dtype, matmul=None):
    """``O_s + O_l W^T + b`` computed in the dtype of ``weight``/``bias``, cast to ``out_dtype``.

    ``o_linear`` may be None when ``weight`` is None (the branch does not reach the output).
    ``matmul``: the 2-D product to use (default ``xp.matmul``).
    """
    acc = (weight if weight is not None else bias).dtype
    out = o_sparse.astype(acc)
    if weight is not None:
        out = out + _rows_times(matmul or xp.matmul, o_linear.astype(acc, copy=False), weight.T)
    if bias is not None:
        out = out + bias
    return out.astype(out_dtype, copy=False)


def projection_grads(xp, d_out, o_linear, dtype, matmul=None):
    """``(dW, db)`` of ``O = O_s + O_l W^T + b``: ``dW = sum_i do_i^T O_l,i``, ``db = sum_i do_i``.
    """
    D = d_out.shape[-1]
    g = d_out.astype(dtype).reshape(-1, D)
    o_rows = o_linear.astype(dtype, copy=False).reshape(-1, o_linear.shape[-1])
    return (matmul or xp.matmul)(g.T, o_rows), g.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Dispatch: the backend's hook when it has one, else the functions above.


def linear_branch(backend, q, k, v, marginal, block, name, eps, mode="marginal", **options):
    """``O_l`` by ``backend.linear_branch`` (accumulation dtype, ``(B, Hq, Nq, D)``)."""
    return backend.linear_branch(q, k, v, marginal, block, name, eps, mode=mode, **options)


def sla_output(backend, q, k, v, o_sparse, marginal, block, name, eps, weight, bias, out_dtype,
               mode="marginal", **options):
    """The SLA output ``O_s + O_l W^T + b`` in ``out_dtype``.

    Uses ``backend.sla_merge`` (one fused pipeline, e.g. on the GPU) when the backend has one;
    otherwise the backend's ``linear_branch`` and :func:`merge`. With neither ``weight`` nor
    ``bias`` this is ``O_s`` itself and the linear branch is not computed.
    """
    if weight is None and bias is None:
        return o_sparse.astype(out_dtype, copy=False)
    fused = getattr(backend, "sla_merge", None)
    if fused is not None:
        return fused(q, k, v, o_sparse, marginal, block, name, eps, weight, bias, out_dtype,
                     mode=mode, **options)
    o_linear = None
    if weight is not None:
        o_linear = linear_branch(backend, q, k, v, marginal, block, name, eps, mode, **options)
    xp = _namespace(o_sparse)
    return merge(xp, o_sparse, o_linear, weight, bias, out_dtype,
                 matmul=_matmul_of(backend, xp, options))


def sparse_output(xp, out, o_linear, weight, bias, dtype, matmul=None):
    """The sparse branch's output recovered from the merged one: ``out - (O_l W^T + b)`` in
    ``dtype`` (the inverse of :func:`merge`, what a backward given the forward's output needs
    instead of rerunning the sparse forward)."""
    o_sparse = out.astype(dtype)
    if weight is not None:
        o_sparse = o_sparse - _rows_times(matmul or xp.matmul,
                                          o_linear.astype(dtype, copy=False),
                                          weight.astype(dtype, copy=False).T)
    if bias is not None:
        o_sparse = o_sparse - bias.astype(dtype, copy=False)
    return o_sparse


def linear_vjp(backend, q, k, v, d_out, marginal, block, name, eps, weight, dtype,
               mode="marginal", bias=None, out=None, **options):
    """Gradients through the linear branch and the projection: ``(grads, dW, db, o_sparse)``.

    ``grads`` is ``(dq, dk, dv)`` in ``dtype`` from ``backend.linear_backward`` given
    ``dL/dO_l = do W``, or None when ``weight`` is None (W = 0: the branch does not reach the
    output, its gradient is exactly zero); ``dW``, ``db`` (at W = 0 too) in ``dtype``.
    ``o_sparse`` is :func:`sparse_output` of the forward's merged ``out`` when it is given
    (from the ``O_l`` computed here for ``dW`` anyway), else None; a backend's own
    ``sla_linear_vjp`` may return instead what its ``attention_backward`` takes for ``out``
    (the GPU's ``MergedOutput``: the merged output and the terms that give ``delta``).

    A backend with ``sla_linear_vjp`` (the GPU: one pipeline, the forward's states reused by
    the backward) does all of it; otherwise the backend's ``linear_branch`` and
    ``linear_backward`` and the functions above.
    """
    fused = getattr(backend, "sla_linear_vjp", None)
    if fused is not None:
        return fused(q, k, v, d_out, marginal, block, name, eps, weight, bias, out, mode=mode,
                     **options)
    xp = _namespace(d_out)
    matmul = _matmul_of(backend, xp, options)
    d_linear = (None if weight is None  # W = 0: the branch's gradient is exactly zero
                else _rows_times(matmul, d_out.astype(dtype), weight.astype(dtype, copy=False)))
    both = getattr(backend, "linear_backward_and_output", None)
    grads = None
    if d_linear is not None and both is not None:
        # The backend's backward also gives O_l (the CPU's: one build of the states, not two).
        grads, o_linear = both(q, k, v, marginal, block, name, eps, d_linear, mode=mode,
                               **options)
    else:
        o_linear = linear_branch(backend, q, k, v, marginal, block, name, eps, mode, **options)
    d_weight, d_bias = projection_grads(xp, d_out, o_linear, dtype, matmul)
    o_sparse = (None if out is None
                else sparse_output(xp, out, o_linear, weight, bias, dtype, matmul))
    if d_linear is not None and grads is None:
        grads = backend.linear_backward(q, k, v, marginal, block, name, eps, d_linear,
                                        mode=mode, **options)
    return grads, d_weight, d_bias, o_sparse
