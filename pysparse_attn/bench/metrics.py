"""Accuracy metrics of one run against exact dense attention (float64)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DenseReference", "dense_reference", "recall_from_tile_mass", "error_metrics",
           "recall_metrics"]


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
    """

    out: np.ndarray
    tile_mass: np.ndarray
    block: tuple


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


def recall_from_tile_mass(reference: DenseReference, kept):
    """Exact recall ``(B, H, Nq)`` of the kept tile set ``kept (B, H, nq, nk)``."""
    kept = np.asarray(kept, dtype=bool)
    Nq = reference.tile_mass.shape[2]
    rows = np.repeat(kept, reference.block[0], axis=2)[:, :, :Nq]
    return (reference.tile_mass * rows).sum(axis=-1)


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
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(reference_out, dtype=np.float64)
    diff = out - ref
    per_head = np.sqrt((diff ** 2).sum(axis=(2, 3)) / (ref ** 2).sum(axis=(2, 3)))
    return {
        "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        "rel_l1": float(np.abs(diff).sum() / np.abs(ref).sum()),
        "cosine": float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref))),
        "rel_l2_worst_head": float(per_head.max()),
    }
