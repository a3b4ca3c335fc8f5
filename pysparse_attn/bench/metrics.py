"""Accuracy metrics of one run against exact dense attention.

Two references: :func:`dense_reference`, float64 on the host over every row (the CPU default),
and :func:`sampled_reference`, an exact float32 computation over a sample of rows written with
the array API, so it runs where the tensors are (on a GPU, a Wan-shaped reference then takes
seconds instead of the hours a float64 host pass would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def _host(x):
    """A NumPy view of ``x`` (a CuPy array is copied to the host)."""
    return x.get() if hasattr(x, "get") else np.asarray(x)

__all__ = ["DenseReference", "dense_reference", "sampled_reference", "sample_rows",
           "recall_from_tile_mass", "error_metrics", "recall_metrics"]


@dataclass
class DenseReference:
    """Exact dense attention of a workload and each row's softmax mass per key tile.

    Attributes
    ----------
    out : float64 array ``(B, H, Nq, D)``
        ``softmax(scale q k^T) v``.
    tile_mass : float64 array ``(B, H, Nq, nk)``
        Share of row ``i``'s softmax mass in key tile ``J``; rows sum to one. The recall of any
        kept set is a sum over this array, the same float64 quantity
        :func:`pysparse_attn.recall` computes, without redoing ``q k^T`` per run.
    block : (int, int)
    rows : int array or None
        Query rows the reference covers, ascending, the same for every (batch, head); None
        means every row. ``out`` and ``tile_mass`` then hold those rows only.
    description : str
        What was computed, for result records.
    """

    out: np.ndarray
    tile_mass: np.ndarray
    block: tuple
    rows: Optional[np.ndarray] = None
    description: str = "float64, every row"

    def restrict(self, x):
        """The rows of a ``(B, H, Nq, ...)`` output this reference covers, on the host (picked
        where ``x`` lives, so only those rows travel)."""
        if self.rows is None:
            return _host(x)
        if not isinstance(x, np.ndarray) and hasattr(x, "get"):
            import cupy

            return x[:, :, cupy.asarray(self.rows)].get()
        return _host(x)[:, :, self.rows]


def dense_reference(q, k, v, block, scale=None, rows_per_chunk=1024):
    """Exact float64 dense attention and per-tile row mass, in row chunks (bounded memory).

    Parameters
    ----------
    q : array ``(B, H, Nq, D)``
    k, v : arrays ``(B, Hkv, Nk, D)``
    block : (int, int)
    scale : float, optional
        ``D ** -0.5`` by default.
    rows_per_chunk : int
        Query rows whose logits are held at once (``rows_per_chunk * Nk`` float64).

    Returns
    -------
    DenseReference
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    scale = D ** -0.5 if scale is None else float(scale)
    starts = np.arange(0, Nk, block[1])
    out = np.empty((B, H, Nq, D))
    mass = np.empty((B, H, Nq, starts.size))
    for b in range(B):
        for h in range(H):
            keys = np.asarray(k[b, h // group], dtype=np.float64)
            values = np.asarray(v[b, h // group], dtype=np.float64)
            for r0 in range(0, Nq, rows_per_chunk):
                rows = np.asarray(q[b, h, r0:r0 + rows_per_chunk], dtype=np.float64)
                logits = scale * (rows @ keys.T)
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                out[b, h, r0:r0 + rows_per_chunk] = p @ values
                mass[b, h, r0:r0 + rows_per_chunk] = np.add.reduceat(p, starts, axis=1)
    return DenseReference(out=out, tile_mass=mass, block=tuple(block))


def sample_rows(n_rows: int, count: Optional[int], seed: int = 0):
    """``count`` distinct query rows of ``n_rows``, ascending (all of them when ``count`` is
    None or at least ``n_rows``). The first and last row are always in: the last one lies in
    the partial tile, where padding bugs would show."""
    if count is None or count >= n_rows:
        return np.arange(n_rows)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 2:
        raise ValueError(f"count must be an int >= 2 or None, got {count!r}")
    inner = np.random.default_rng(seed).choice(np.arange(1, n_rows - 1), size=count - 2,
                                               replace=False)
    return np.sort(np.concatenate([[0, n_rows - 1], inner])).astype(np.int64)


def sampled_reference(q, k, v, block, rows, scale=None, rows_per_chunk=1024,
                      precision="float32"):
    """Exact attention and per-tile row mass on the query rows ``rows``, where the arrays are.

    Computed with the array API namespace of ``q`` (NumPy, CuPy, ...) on the arrays' device:
    the full logits row ``scale * q_i . k_j`` over every key, an exact softmax (no tiling, no
    skipping) and ``P V``, in float32 (16-bit inputs are widened exactly) or float64. The
    float32 rounding of this reference (about 1e-6 relative) is far below the error budgets it
    judges; float64 is the library's ground truth, affordable on sampled rows.

    Parameters
    ----------
    q : array ``(B, H, Nq, D)``
    k, v : arrays ``(B, Hkv, Nk, D)``
    block : (int, int)
    rows : 1-D int array
        Ascending query-row indices (see :func:`sample_rows`).
    scale : float, optional
        ``D ** -0.5`` by default.
    rows_per_chunk : int
        Sampled rows whose logits are held at once (``rows_per_chunk * Nk`` floats).
    precision : {"float32", "float64"}
        Arithmetic of the reference.

    Returns
    -------
    DenseReference
        ``out`` ``(B, H, len(rows), D)`` and ``tile_mass`` ``(B, H, len(rows), nk)``, float64
        NumPy arrays on the host, and ``rows``.
    """
    from array_api_compat import array_namespace

    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    xp = array_namespace(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    scale = D ** -0.5 if scale is None else float(scale)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= Nq:
        raise ValueError(f"rows must be a non-empty 1-D array of indices in [0, {Nq}), "
                         f"got {rows!r}")
    n_tiles = -(-Nk // block[1])
    padding = n_tiles * block[1] - Nk
    out = np.empty((B, H, rows.size, D))
    mass = np.empty((B, H, rows.size, n_tiles))
    acc = xp.float64 if precision == "float64" else xp.float32
    for b in range(B):
        for h in range(H):
            keys = xp.astype(k[b, h // group, ...], acc)
            values = xp.astype(v[b, h // group, ...], acc)
            for r0 in range(0, rows.size, rows_per_chunk):
                chunk = rows[r0:r0 + rows_per_chunk]
                index = xp.asarray(chunk, device=_device(q))
                picked = xp.astype(xp.take(q[b, h, ...], index, axis=0), acc)
                logits = xp.matmul(picked, xp.matrix_transpose(keys)) * scale
                p = xp.exp(logits - xp.max(logits, axis=1, keepdims=True))
                p = p / xp.sum(p, axis=1, keepdims=True)
                out[b, h, r0:r0 + chunk.size] = _host(xp.matmul(p, values))
                if padding:
                    p = xp.concat([p, xp.zeros((chunk.size, padding), dtype=acc,
                                               device=_device(q))], axis=1)
                tiles = xp.sum(xp.reshape(p, (chunk.size, n_tiles, block[1])), axis=2)
                mass[b, h, r0:r0 + chunk.size] = _host(tiles)
    return DenseReference(out=out, tile_mass=mass, block=tuple(block), rows=rows,
                          description=f"{precision} exact, {rows.size} of {Nq} rows sampled")


def _device(x):
    from array_api_compat import device

    return device(x)


def recall_from_tile_mass(reference: DenseReference, kept):
    """Exact recall ``(B, H, rows)`` of the kept tile set ``kept (B, H, nq, nk)`` on the rows
    the reference covers (every row for :func:`dense_reference`)."""
    kept = _host(kept).astype(bool)
    rows = (np.arange(reference.tile_mass.shape[2]) if reference.rows is None
            else reference.rows)
    kept_rows = kept[:, :, rows // reference.block[0]]
    return (reference.tile_mass * kept_rows).sum(axis=-1)


def recall_metrics(recall):
    """``recall_min``, ``recall_p1`` (1st percentile over rows) and ``recall_mean``."""
    recall = np.asarray(recall, dtype=np.float64).ravel()
    return {"recall_min": float(recall.min()), "recall_p1": float(np.percentile(recall, 1)),
            "recall_mean": float(recall.mean())}


def error_metrics(out, reference_out):
    """Errors of ``out`` against the dense reference, over the whole tensor.

    Returns ``rel_l2 = |out - ref|_2 / |ref|_2``, ``rel_l1`` (same with L1 norms),
    ``cosine`` (of the flattened tensors), and ``rel_l2_worst_head`` (the largest per-head
    relative L2 error, since one badly served head can hide in the average).
    """
    out = np.asarray(_host(out), dtype=np.float64)
    ref = np.asarray(_host(reference_out), dtype=np.float64)
    diff = out - ref
    per_head = np.sqrt((diff ** 2).sum(axis=(2, 3)) / (ref ** 2).sum(axis=(2, 3)))
    return {
        "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        "rel_l1": float(np.abs(diff).sum() / np.abs(ref).sum()),
        "cosine": float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref))),
        "rel_l2_worst_head": float(per_head.max()),
    }
