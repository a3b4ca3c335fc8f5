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

from .._arrays import check_tile_mask
from ..branches.feature_maps import FEATURE_MAPS
from .._rules import BLASST, CEF, NO_SKIP, RECALL, RECALL_EXACT

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
    "available",
    "unavailable_reason",
    "supported_blocks",
]

_DTYPES = ("float32", "float64", "float16", "bfloat16")
_RULE_CODES = (NO_SKIP, BLASST, CEF, RECALL, RECALL_EXACT)


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


def forward(q, k, v, plan, rule_code, rule_param, scale, want_stats, threads=None):
    """Fused sparse attention over ``plan`` with the skip rule ``(rule_code, rule_param)``.

    Parameters
    ----------
    q : ndarray ``(B, Hq, Nq, D)``
    k, v : ndarray ``(B, Hkv, Nk, D)``
        Same dtype as ``q``: float32, float64, float16 or bfloat16; any strides.
    plan : pysparse_attn._plan.Plan
        Visit lists (NumPy arrays).
    rule_code : int
        0 none, 1 Blasst, 2 Cef, 3 Recall, 4 Recall exact (``docs/internals.rst``).
    rule_param : float
        The rule's precomputed parameter.
    scale : float
        Logit scale.
    want_stats : bool
        Also return the kept and visited tiles and the recall bound.
    threads : int, optional
        OpenMP threads (default: ``OMP_NUM_THREADS`` or all cores).

    Returns
    -------
    out : ndarray ``(B, Hq, Nq, D)``, the input dtype
    lse : float32 ndarray ``(B, Hq, Nq)``
    kept, visited : bool ndarray ``(B, Hq, nq, nk)`` or None
    recall_bound : float32 ndarray ``(B, Hq, Nq)`` or None
    """
    _require_extension()
    B, Hq, _, Nq, Nk, D = _check_inputs(q, k, v)
    if int(rule_code) not in _RULE_CODES:
        raise ValueError(f"rule_code must be one of {_RULE_CODES}, got {rule_code!r}")
    block = _check_block(plan.block, Nq, Nk)
    visit = np.ascontiguousarray(plan.visit, dtype=np.int32)
    count = np.ascontiguousarray(plan.count, dtype=np.int32)
    grid = (B, Hq, plan.nq, plan.nk)
    if (plan.nq, plan.nk) != (-(-Nq // block[0]), -(-Nk // block[1])):
        raise ValueError(f"plan has {plan.nq} x {plan.nk} tiles, but block {plan.block} makes "
                         f"{-(-Nq // block[0])} x {-(-Nk // block[1])} of these inputs")
    if visit.ndim != 4 or visit.shape[:3] != grid[:3] or count.shape != grid[:3]:
        raise ValueError(f"plan must have visit (B, H, nq, L) and count (B, H, nq) for "
                         f"{grid[:3]}, got {visit.shape} and {count.shape}")
    if count.min() < 1 or count.max() > visit.shape[3]:
        raise ValueError("plan counts must be in [1, L]")
    listed = np.arange(visit.shape[3]) < count[..., None]
    if np.any(listed & ((visit < 0) | (visit >= plan.nk))):
        raise ValueError(f"plan visit lists must hold key tiles in [0, {plan.nk})")
    out = np.empty((B, Hq, Nq, D), dtype=q.dtype)
    lse = np.empty((B, Hq, Nq), dtype=np.float32)
    kept = np.zeros(grid, dtype=np.bool_) if want_stats else None
    visited = np.zeros(grid, dtype=np.bool_) if want_stats else None
    bound = np.empty((B, Hq, Nq), dtype=np.float32) if want_stats else None
    _cpu.forward(q, k, v, visit, count, block, int(rule_code), float(rule_param), float(scale),
                 out, lse, kept, visited, bound, _threads(threads))
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
    """SLA linear branch ``O_l = phi(q) H_I / (phi(q) . Z_I + eps)`` (DESIGN.md section 6).

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


def attention_backward(q, k, v, do, kept, block, scale, threads=None):
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
    threads : int, optional
        OpenMP threads.

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
    dq = np.empty((B, Hq, Nq, D), dtype=acc)
    dk = np.empty((B, Hkv, Nk, D), dtype=acc)
    dv = np.empty((B, Hkv, Nk, D), dtype=acc)
    _cpu.backward(q, k, v, do, flags, block, float(scale), dq, dk, dv, _threads(threads))
    return dq, dk, dv


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
    _cpu.linear_backward(q, k, v, flags, block, feature_map, eps, d_linear, dq, dk, dv,
                         _threads(threads))
    return dq, dk, dv
