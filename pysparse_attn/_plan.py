"""The plan: per query tile, the ordered list of key tiles to visit (plain data).

The builder is written once against the array API subset shared by NumPy and CuPy, so the plan
of GPU inputs is built on the GPU with no host round trip. Mask preprocessing lives here, apart
from every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ._select import BlockMask, SlaSplit, TopK, TopP

__all__ = ["Plan", "block_scores", "build_plan", "tile_count"]

ORDERS = ("natural", "score", "peak")


def tile_count(n: int, b: int) -> int:
    """Number of tiles of size ``b`` covering ``n`` items (the last may be partial)."""
    return -(-n // b)


@dataclass
class Plan:
    """Visit lists of a call, in the backend's array namespace.

    Attributes
    ----------
    visit : int32 array ``(B, H, nq, L)``
        Key-tile indices in visit order; ``-1`` past ``count``.
    count : int32 array ``(B, H, nq)``
        Valid entries of each visit list (at least one).
    marginal : bool array ``(B, H, nq, nk)`` or None
        SLA: key tiles feeding the linear branch.
    block : tuple of int
        ``(Bq, Bk)``.
    nq, nk : int
        Query and key tile counts.
    """

    visit: Any
    count: Any
    marginal: Optional[Any]
    block: tuple
    nq: int
    nk: int

    @property
    def max_count(self) -> int:
        return int(self.visit.shape[-1])

    # TEMPORARY (kernels branch, until the frontend's CSR Plan is merged): CSR views of the
    # padded visit lists, so the CSR kernels can be tested. Dropped at the merge.
    @property
    def row_offsets(self):
        xp = _namespace(self.count)
        B, H, nq = self.count.shape
        offsets = xp.zeros((B, H, nq + 1), dtype=xp.int32)
        offsets[..., 1:] = xp.cumsum(self.count, axis=-1)
        return offsets

    @property
    def row_indices(self):
        xp = _namespace(self.count)
        B, H, nq, L = self.visit.shape
        slot = xp.arange(L, dtype=xp.int32)
        listed = slot < self.count[..., None]
        target = xp.where(listed, self.row_offsets[..., :-1, None] + slot, nq * L)
        indices = xp.full((B, H, nq * L + 1), -1, dtype=xp.int32)
        xp.put_along_axis(indices, target.reshape(B, H, nq * L).astype(xp.int64),
                          self.visit.reshape(B, H, nq * L), axis=-1)
        return xp.ascontiguousarray(indices[..., :nq * L])


def _namespace(x):  # TEMPORARY, see Plan.row_offsets
    import numpy

    return numpy if isinstance(x, numpy.ndarray) else __import__("cupy")


def _pool(xp, x, b):
    """Mean of each tile of ``b`` rows of ``x (B, H, N, D)`` over its valid rows.

    Accumulates in float64 for float64 inputs and float32 otherwise, reading ``x`` in place
    (no padded copy of q or k).
    """
    B, H, N, D = x.shape
    acc = xp.float64 if x.dtype == xp.float64 else xp.float32
    full = N // b
    parts = []
    if full:
        parts.append(x[:, :, :full * b].reshape(B, H, full, b, D).mean(axis=3, dtype=acc))
    if N % b:
        parts.append(x[:, :, full * b:].mean(axis=2, keepdims=True, dtype=acc))
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=2)


def block_scores(xp, q, k, block, scale):
    """Block scores ``S_IJ = scale * qbar_I . (kbar_J - mean_J kbar_J)`` of DESIGN.md section 3.

    ``q (B, Hq, Nq, D)`` and ``k (B, Hkv, Nk, D)`` are floating arrays of namespace ``xp``;
    the result has shape ``(B, Hq, nq, nk)``, float64 for float64 inputs, float32 otherwise.
    """
    Bq, Bk = block
    group = q.shape[1] // k.shape[1]
    qbar = _pool(xp, q, Bq)
    kbar = _pool(xp, k, Bk)
    kbar = kbar - kbar.mean(axis=2, keepdims=True)
    if group > 1:
        kbar = xp.repeat(kbar, group, axis=1)
    return scale * (qbar @ xp.swapaxes(kbar, -1, -2))


def _descending_rank(xp, scores):
    """Rank of every tile by descending score (0 = best), ties to the lower index."""
    order = xp.argsort(-scores, axis=-1, kind="stable")  # CuPy's argsort is always stable
    rank = xp.empty_like(order)
    positions = xp.broadcast_to(xp.arange(scores.shape[-1], dtype=order.dtype), order.shape)
    xp.put_along_axis(rank, order, positions, axis=-1)
    return order, rank


def _visit_lists(xp, keep, rank, order, peak):
    """Order the kept tiles of each query tile; pad with -1 to the longest list."""
    nk = keep.shape[-1]
    count = keep.sum(axis=-1).astype(xp.int32)
    index = xp.broadcast_to(xp.arange(nk, dtype=xp.int64), keep.shape)
    if order == "natural":
        key = index
    else:
        # Rank among the kept tiles only (a mask may keep tiles of any rank).
        kept_sorted = xp.take_along_axis(keep, xp.argsort(rank, axis=-1), axis=-1)
        kept_rank_sorted = xp.cumsum(kept_sorted, axis=-1) - 1
        kept_rank = xp.take_along_axis(kept_rank_sorted, rank, axis=-1)
        if order == "score":
            key = kept_rank
        else:
            tail = count[..., None].astype(xp.int64) - 1 - kept_rank
            key = xp.where(kept_rank < peak, kept_rank, peak + tail)
    key = xp.where(keep, key, 2 * nk + index)
    longest = int(count.max())
    visit = xp.argsort(key, axis=-1)[..., :longest].astype(xp.int32)
    slot = xp.arange(longest, dtype=xp.int32)
    visit = xp.where(slot < count[..., None], visit, xp.int32(-1))
    return xp.ascontiguousarray(visit), xp.ascontiguousarray(count)


def build_plan(xp, q, k, selector, order, peak, block, scale, linear="marginal"):
    """Build the :class:`Plan` of ``selector`` (or dense when ``None``) for canonical q, k.

    ``selector`` is ``None``, :class:`BlockMask`, :class:`TopK`, :class:`TopP` or the internal
    :class:`SlaSplit`; ``order`` one of ``"natural"``, ``"score"``, ``"peak"``.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    shape = (B, H, nq, nk)
    marginal = None
    needs_scores = order != "natural" or isinstance(selector, (TopK, TopP, SlaSplit))
    if needs_scores:
        scores = block_scores(xp, q, k, block, scale)
        sorted_idx, rank = _descending_rank(xp, scores)
    else:
        rank = sorted_idx = None

    if selector is None:
        keep = xp.ones(shape, dtype=bool)
    elif isinstance(selector, BlockMask):
        keep = xp.broadcast_to(xp.asarray(selector.mask, dtype=bool), shape)
    elif isinstance(selector, TopK):
        keep = rank < selector.count(nk)
    elif isinstance(selector, TopP):
        mass = scores - scores.max(axis=-1, keepdims=True)
        mass = xp.exp(mass)
        mass = mass / mass.sum(axis=-1, keepdims=True)
        cumulative = xp.cumsum(xp.take_along_axis(mass, sorted_idx, axis=-1), axis=-1)
        needed = xp.minimum((cumulative < selector.p).sum(axis=-1) + 1, nk)
        keep = rank < needed[..., None]
    elif isinstance(selector, SlaSplit):
        n_critical, n_negligible = selector.counts(nk)
        keep = rank < n_critical
        if linear == "marginal":
            marginal = ~keep & (rank < nk - n_negligible)
        elif linear == "complement":
            marginal = ~keep
        else:
            marginal = xp.ones(shape, dtype=bool)
    else:
        raise TypeError("select must be None, BlockMask, TopK or TopP, got "
                        f"{type(selector).__name__}")

    visit, count = _visit_lists(xp, keep, rank, order, peak)
    return Plan(visit=visit, count=count, marginal=marginal, block=tuple(block), nq=nq, nk=nk)
