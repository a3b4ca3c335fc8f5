"""The fast CPU backend: the C++/OpenMP kernels of ``cpu/`` behind the backend contract.

Inputs are canonical ``(B, H, N, D)`` NumPy arrays of any strides (a ``"bnhd"`` input is a
transposed view and stays one: the kernels read through strides). float32 and float64 are
computed natively (float64 accumulates in float64); float16 and bfloat16 are widened to float32
one tile row at a time inside the kernels. Every kernel runs with the GIL released, parallel
over (batch, head, query tile) or (batch, kv head, key tile); ``threads`` overrides
``OMP_NUM_THREADS``.

See ``docs/internals.rst`` for the contract of each function.
"""

from __future__ import annotations

import numpy as np

from . import add_gradients
from .._arrays import check_tile_mask
from ..branches.feature_maps import FEATURE_MAPS
from .._rules import NO_SKIP_FUNCTOR, rule_functor

try:
    from .. import _cpu
except ImportError as _error:  # the extension was not built (e.g. no compiler at install)
    _cpu = None
    _IMPORT_ERROR = str(_error)
else:
    _IMPORT_ERROR = None

__all__ = [
    "forward",
    "linear_branch",
    "attention_backward",
    "linear_backward",
    "linear_backward_and_output",
    "matmul",
    "available",
    "unavailable_reason",
    "supported_blocks",
]

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def available() -> bool:
    """Whether the compiled extension ``pysparse_attn._cpu`` could be imported."""
    return _cpu is not None


def unavailable_reason():
    """Why the backend cannot run here, or None when it can."""
    return None if _cpu is not None else f"the C++ extension is not built ({_IMPORT_ERROR})"


def supported_blocks():
    """Any positive tile sizes (``None``)."""
    return None


def _require_extension():
    if _cpu is None:
        raise RuntimeError(unavailable_reason())


def _threads(threads) -> int:
    """The thread count the kernels get: 0 means OpenMP's default (``OMP_NUM_THREADS``)."""
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return int(threads)


def _accumulator(dtype):
    """float64 for float64 inputs, float32 for the others."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _check_inputs(q, k, v):
    """Shapes and dtypes of canonical q, k, v; returns ``(B, Hq, Hkv, Nq, Nk, D)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {x.shape}")
        if x.dtype.name not in _DTYPES:
            raise TypeError(f"{name} must be one of {_DTYPES}, got dtype {x.dtype}")
        if not x.dtype.isnative:
            raise TypeError(f"{name} must be in native byte order, got dtype {x.dtype.str}")
        if 0 in x.shape:
            raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape ({B}, Hkv, Nk, {D}), got {k.shape}")
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    return B, Hq, Hkv, Nq, k.shape[2], D


def _check_block(block, n_queries, n_keys):
    """``(Bq, Bk)`` for the kernels, each clipped to its sequence length.

    A tile longer than its sequence covers it exactly as a tile of the sequence's length does
    (one, partial, tile), so clipping changes no result and keeps the per-thread buffers, which
    are sized by the tile, from growing with an oversized block.
    """
    if len(block) != 2 or any(int(b) < 1 for b in block):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    return min(int(block[0]), n_queries), min(int(block[1]), n_keys)


def _tile_flags(name, flags, shape):
    """A C-contiguous byte view of a bool tile mask of the expected shape."""
    return np.ascontiguousarray(check_tile_mask(name, flags, shape, on_gpu=False)).view(np.uint8)


def _plan_rows(plan, batch, heads, nq, nk):
    """The plan's CSR rows as C-contiguous int32 host arrays, checked so that the kernel cannot
    read out of bounds (cheap on the host; the GPU backend leaves this to ``Plan``)."""
    offsets = np.ascontiguousarray(plan.row_offsets, dtype=np.int32)
    indices = np.ascontiguousarray(plan.row_indices, dtype=np.int32)
    if offsets.shape != (batch, heads, nq + 1):
        raise ValueError(f"plan.row_offsets must have shape {(batch, heads, nq + 1)} for these "
                         f"inputs, got {offsets.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (batch, heads):
        raise ValueError(f"plan.row_indices must have shape {(batch, heads)} + (capacity,), got "
                         f"{indices.shape}")
    counts = np.diff(offsets, axis=-1)
    if (offsets[..., 0] != 0).any() or (counts < 0).any() or \
            (offsets[..., -1] > indices.shape[2]).any():
        raise ValueError("plan.row_offsets must start at 0, never decrease and end within "
                         "plan.row_indices")
    listed = np.arange(indices.shape[2]) < offsets[..., -1:]
    if np.any(listed & ((indices < 0) | (indices >= nk))):
        raise ValueError(f"plan.row_indices must hold key tiles in [0, {nk})")
    return offsets, indices


def forward(q, k, v, plan, rule, scale, want_stats, out_dtype=None, threads=None):
    """Fused sparse attention over ``plan`` with the in-loop skip rule ``rule``.

    Parameters
    ----------
    q : ndarray ``(B, Hq, Nq, D)``
    k, v : ndarray ``(B, Hkv, Nk, D)``
        Same dtype as ``q``: float32, float64, float16 or bfloat16; any strides.
    plan : pysparse_attn.Plan
        CSR visit lists (NumPy arrays); rows with no visited tile give O = 0, LSE = -inf.
    rule : SkipRule or None
        In-loop skip rule; its parameter may be one per query head.
    scale : float
        Logit scale.
    want_stats : bool
        Also return the kept and visited tiles and the recall bound.
    out_dtype : numpy dtype, optional
        ``numpy.float32`` writes O in float32 (unrounded); default the input dtype.
    threads : int, optional
        OpenMP threads (default: ``OMP_NUM_THREADS`` or all cores).

    Returns
    -------
    out : ndarray ``(B, Hq, Nq, D)``, ``out_dtype``
    lse : ndarray ``(B, Hq, Nq)``, float64 for float64 inputs, else float32
    kept, visited : bool ndarray ``(B, Hq, nq, nk)`` or None
    recall_bound : ndarray ``(B, Hq, Nq)`` (dtype of ``lse``) or None
    """
    _require_extension()
    B, Hq, _, Nq, Nk, D = _check_inputs(q, k, v)
    block = _check_block(plan.block, Nq, Nk)
    nq, nk = -(-Nq // block[0]), -(-Nk // block[1])
    offsets, indices = _plan_rows(plan, B, Hq, nq, nk)
    functor = rule_functor(rule)
    params = None if functor == NO_SKIP_FUNCTOR else np.ascontiguousarray(
        rule.kernel_params(Hq), dtype=np.float64)
    if out_dtype is None:
        out_dtype = q.dtype
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (q.dtype, np.dtype(np.float32)):
        raise TypeError(f"out_dtype must be None, float32 or the input dtype ({q.dtype}), got "
                        f"{out_dtype}")
    acc = _accumulator(q.dtype)
    grid = (B, Hq, nq, nk)
    out = np.empty((B, Hq, Nq, D), dtype=out_dtype)
    lse = np.empty((B, Hq, Nq), dtype=acc)
    kept = np.zeros(grid, dtype=np.bool_) if want_stats else None
    visited = np.zeros(grid, dtype=np.bool_) if want_stats else None
    bound = np.empty((B, Hq, Nq), dtype=acc) if want_stats else None
    _cpu.forward(q, k, v, offsets, indices, block, functor, params, float(scale), out, lse,
                 kept, visited, bound, _threads(threads))
    return out, lse, kept, visited, bound


def _check_marginal(marginal, q, k, block):
    nq = -(-q.shape[2] // block[0])
    nk = -(-k.shape[2] // block[1])
    return _tile_flags("marginal", marginal, (q.shape[0], q.shape[1], nq, nk))


def _check_feature_map(feature_map, eps):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def linear_branch(q, k, v, marginal, block, feature_map, eps, threads=None, mode=None):
    """SLA linear branch ``O_l = phi(q) H_I / (phi(q) . Z_I + eps)`` (docs/design.rst section 6).

    Parameters
    ----------
    q, k, v : ndarray
        Canonical inputs as in :func:`forward`.
    marginal : bool ndarray ``(B, Hq, nq, nk)``
        Key tiles feeding each query tile's linear branch.
    block : (int, int)
        Tile sizes.
    feature_map : {"softmax", "elu1", "relu"}
        phi, applied to q and k along the head dimension.
    eps : float
        Added to the denominator.
    threads : int, optional
        OpenMP threads.
    mode : {"marginal", "complement", "global"}, optional
        The SLA ``linear`` option; the marginal set already says everything this kernel needs.

    Returns
    -------
    ndarray ``(B, Hq, Nq, D)``
        float32 (float64 for float64 inputs); zero rows where a query tile has no marginal
        tile or the denominator is exactly zero.
    """
    _require_extension()
    B, Hq, _, Nq, Nk, D = _check_inputs(q, k, v)
    block = _check_block(block, Nq, Nk)
    eps = _check_feature_map(feature_map, eps)
    flags = _check_marginal(marginal, q, k, block)
    out = np.empty((B, Hq, Nq, D), dtype=_accumulator(q.dtype))
    _cpu.linear_forward(q, k, v, flags, block, feature_map, eps, out, _threads(threads))
    return out


def attention_backward(q, k, v, do, kept, block, scale, *, out=None, lse=None,
                       deterministic=False, grad_dtype=None, threads=None, addend=None,
                       density=None):
    """Gradients of exact attention restricted to the key tiles of ``kept``.

    Parameters
    ----------
    q, k, v : ndarray
        Canonical inputs as in :func:`forward`.
    do : ndarray ``(B, Hq, Nq, D)``
        Cotangent of the output, any strides, the dtype of ``q``.
    kept : bool ndarray ``(B, Hq, nq, nk)``
        The forward's kept tiles (every query tile keeps at least one).
    block : (int, int)
        Tile sizes.
    scale : float
        Logit scale.
    out : ndarray ``(B, Hq, Nq, D)``, optional
        The forward's output over ``kept`` (the dtype of ``q`` or float32): ``Delta = dO . O``
        is taken from it instead of recomputing O.
    lse : ndarray ``(B, Hq, Nq)``, optional
        The forward's natural-log LSE over ``kept``: used instead of recomputing it. With
        both, the kernel's recomputation loop (two of its nine tile products) does not run.
    deterministic : bool
        Accepted for the contract: this backend always is (every output row is written by
        one task, in a fixed order, whatever the thread count).
    grad_dtype : dtype, optional
        Accepted for the contract; the gradients come in the accumulation dtype.
    threads : int, optional
        OpenMP threads.
    addend : (dq, dk, dv), optional
        Another branch's gradients (SLA's linear side), added to the result.
    density : float, optional
        Accepted for the contract (the GPU backend's kernel choice).

    Returns
    -------
    dq : ndarray ``(B, Hq, Nq, D)``
    dk, dv : ndarray ``(B, Hkv, Nk, D)``
        float32 (float64 for float64 inputs); GQA sums each group's query heads into its kv
        head.
    """
    _require_extension()
    B, Hq, Hkv, Nq, Nk, D = _check_inputs(q, k, v)
    block = _check_block(block, Nq, Nk)
    if not isinstance(do, np.ndarray) or do.shape != q.shape:
        raise ValueError(f"do must be an ndarray of shape {q.shape}")
    if do.dtype != q.dtype:
        raise TypeError(f"do must have the dtype of q ({q.dtype}), got {do.dtype}")
    nq, nk = -(-Nq // block[0]), -(-Nk // block[1])
    flags = _tile_flags("kept", kept, (B, Hq, nq, nk))
    if not flags.reshape(-1, nk).any(axis=1).all():
        raise ValueError("kept must keep at least one key tile in every query tile")
    acc = _accumulator(q.dtype)
    saved_delta = None
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != q.shape:
            raise ValueError(f"out must be an ndarray of shape {q.shape}")
        saved_delta = np.einsum("bhnd,bhnd->bhn", do.astype(acc, copy=False),
                                out.astype(acc, copy=False))
    if lse is not None:
        if not isinstance(lse, np.ndarray) or lse.shape != (B, Hq, Nq):
            raise ValueError(f"lse must be an ndarray of shape {(B, Hq, Nq)}")
        lse = np.ascontiguousarray(lse, dtype=acc)
    dq = np.empty((B, Hq, Nq, D), dtype=acc)
    dk = np.empty((B, Hkv, Nk, D), dtype=acc)
    dv = np.empty((B, Hkv, Nk, D), dtype=acc)
    _cpu.backward(q, k, v, do, flags, block, float(scale), dq, dk, dv, _threads(threads),
                  lse, None if saved_delta is None else np.ascontiguousarray(saved_delta))
    return add_gradients((dq, dk, dv), addend)


def linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, threads=None,
                    mode=None):
    """Gradients of :func:`linear_branch` given ``d_linear = dL/dO_l``.

    Parameters
    ----------
    q, k, v, marginal, block, feature_map, eps, threads, mode
        As in :func:`linear_branch`.
    d_linear : ndarray ``(B, Hq, Nq, D)``
        Cotangent of the linear branch's output, any floating dtype.

    Returns
    -------
    dq : ndarray ``(B, Hq, Nq, D)``
    dk, dv : ndarray ``(B, Hkv, Nk, D)``
        float32 (float64 for float64 inputs).
    """
    return _linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, threads,
                            output=False)[0]


def linear_backward_and_output(q, k, v, marginal, block, feature_map, eps, d_linear,
                               threads=None, mode=None):
    """``((dq, dk, dv), O_l)``: :func:`linear_backward` and :func:`linear_branch`'s output in
    one pass, bitwise the same as the two calls (the backward holds H_I and Z_I anyway; the
    two calls would build the key summaries and H_I twice). The SLA backward's hook
    (:func:`pysparse_attn.branches.linear.linear_vjp`), which needs O_l for dW."""
    return _linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, threads,
                            output=True)


def _linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, threads, output):
    _require_extension()
    B, Hq, Hkv, Nq, Nk, D = _check_inputs(q, k, v)
    block = _check_block(block, Nq, Nk)
    eps = _check_feature_map(feature_map, eps)
    flags = _check_marginal(marginal, q, k, block)
    acc = _accumulator(q.dtype)
    if not isinstance(d_linear, np.ndarray) or d_linear.shape != q.shape:
        raise ValueError(f"d_linear must be an ndarray of shape {q.shape}")
    d_linear = d_linear.astype(acc, copy=False)  # the cotangent only; q, k, v are never copied
    dq = np.empty((B, Hq, Nq, D), dtype=acc)
    dk = np.empty((B, Hkv, Nk, D), dtype=acc)
    dv = np.empty((B, Hkv, Nk, D), dtype=acc)
    out = np.empty((B, Hq, Nq, D), dtype=acc) if output else None
    _cpu.linear_backward(q, k, v, flags, block, feature_map, eps, d_linear, dq, dk, dv,
                         _threads(threads), out)
    return (dq, dk, dv), out


def matmul(a, b, threads=None):
    """``a @ b`` of 2-D arrays by the kernels' gemm (``cpu/matmul.cpp``), OpenMP-parallel.

    The branches' dense products on this backend (SLA's projection ``O_l W^T``, ``dO W`` and
    ``dW = dO^T O_l``) go through this rather than NumPy's BLAS: BLAS worker threads keep
    spinning for a while after each call and then compete with the kernels' OpenMP threads
    for the cores. On 2 cores an SLA forward with a projection and its backward ran 1.7x and
    1.6x slower for it.

    Parameters
    ----------
    a : ndarray ``(m, k)``
    b : ndarray ``(k, n)``
        float32 or float64, the same dtype, any strides (a transposed view is read in place).
    threads : int, optional
        OpenMP threads.

    Returns
    -------
    ndarray ``(m, n)``, contiguous, in the inputs' dtype (products accumulate in it).
    """
    _require_extension()
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a's columns ({a.shape[1]}) must match b's rows ({b.shape[0]})")
    out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    _cpu.matmul(a, b, out, _threads(threads))
    return out
