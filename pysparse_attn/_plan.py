"""The plan: per query tile the ordered list of key tiles to visit, and its key-major transpose.

A :class:`Plan` is plain data in compressed-sparse-row form, on the inputs' device (NumPy or
CuPy). The builder is written once against the array API subset shared by NumPy and CuPy, and
never reads device data back to the host: every array size comes from the shapes and the
selector's parameters (:func:`visit_capacity`). The CuPy backend's ``build_plan`` is an
accelerated implementation of the same selection methods; it returns the same :class:`Plan`.
"""

from __future__ import annotations


import numpy as np

from ._select import BlockMask, SlaSplit, TopK, TopP

__all__ = ["Plan", "block_scores", "build_plan", "tile_count", "max_visits_of", "trusted_plan",
           "rows_from_padded"]

#: Visit orders a selector can produce; "given" marks lists taken as the user gave them.
ORDERS = ("natural", "score", "peak")
PLAN_ORDERS = ORDERS + ("given",)


def tile_count(n: int, b: int) -> int:
    """Number of tiles of size ``b`` covering ``n`` items (the last may be partial)."""
    return -(-n // b)


def _namespace(x):
    """NumPy or CuPy, whichever ``x`` belongs to."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


class Plan:
    """Which key tiles each query tile visits, in which order, and the key-major transpose.

    Per (batch, head) the visit lists are stored in compressed-sparse-row form: query tile
    ``i`` of ``(b, h)`` visits ``row_indices[b, h, row_offsets[b, h, i]:row_offsets[b, h, i+1]]``
    in that order. The key-major lists (what a dK/dV pass walks) hold, for key tile ``j``, the
    query tiles visiting it in ascending order. Arrays live on the device of the inputs the plan
    was built for (NumPy or CuPy).

    Build plans with :func:`pysparse_attn.plan` or :meth:`Plan.from_kept`; a plan constructed
    directly is validated once (a bad one raises ``ValueError`` naming the field, which reads
    its arrays back to the host once).

    Parameters
    ----------
    shape : tuple of int
        ``(B, H, Nq, Nk)``; ``H`` counts query heads.
    block : tuple of int
        Tile sizes ``(Bq, Bk)``.
    row_offsets : int32 array ``(B, H, nq + 1)``
        Start of each query tile's list; ``row_offsets[..., 0] == 0``, non-decreasing.
    row_indices : int32 array ``(B, H, capacity)``
        Key tiles in visit order; entries at or past ``row_offsets[..., nq]`` are ``-1``.
    col_offsets, col_indices : int32 arrays ``(B, H, nk + 1)`` and ``(B, H, capacity)``, optional
        The key-major transpose; computed from the rows on first access when omitted.
    marginal : bool array ``(B, H, nq, nk)``, optional
        SLA: the tiles sent to the linear branch.
    order : {"natural", "score", "peak", "given"}
        How the lists were ordered.
    max_visits : int, optional
        A static upper bound on any row's length (``nk`` when omitted).

    Attributes
    ----------
    nq, nk : int
        Query and key tile counts.
    capacity : int
        Length of the index arrays.
    counts : int32 array ``(B, H, nq)``
        Row lengths.
    """

    __slots__ = ("shape", "block", "order", "row_offsets", "row_indices", "marginal",
                 "max_visits", "_col_offsets", "_col_indices", "_padded")

    def __init__(self, shape, block, row_offsets, row_indices, col_offsets=None,
                 col_indices=None, marginal=None, order="given", max_visits=None, *,
                 _trusted=False):
        self.shape = tuple(int(s) for s in shape) if _trusted else shape
        self.block = tuple(int(b) for b in block) if _trusted else block
        self.order = order
        self.row_offsets = row_offsets
        self.row_indices = row_indices
        self._col_offsets = col_offsets
        self._col_indices = col_indices
        self.marginal = marginal
        self.max_visits = max_visits
        self._padded = None
        if not _trusted:
            _validate(self)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def nq(self) -> int:
        return tile_count(self.shape[2], self.block[0])

    @property
    def nk(self) -> int:
        return tile_count(self.shape[3], self.block[1])

    @property
    def capacity(self) -> int:
        return int(self.row_indices.shape[-1])

    @property
    def xp(self):
        """The array namespace of the plan's arrays (NumPy or CuPy)."""
        return _namespace(self.row_offsets)

    @property
    def counts(self):
        """Row lengths, int32 ``(B, H, nq)``: ``diff(row_offsets)``."""
        return self.row_offsets[..., 1:] - self.row_offsets[..., :-1]

    # -- the key-major transpose (lazy: only a backward pass walks it) -------------------------

    @property
    def col_offsets(self):
        """Start of each key tile's list of query tiles, int32 ``(B, H, nk + 1)``."""
        if self._col_offsets is None:
            self._col_offsets, self._col_indices = _transpose(self)
        return self._col_offsets

    @property
    def col_indices(self):
        """Query tiles visiting each key tile, ascending, int32 ``(B, H, capacity)``."""
        if self._col_indices is None:
            self._col_offsets, self._col_indices = _transpose(self)
        return self._col_indices

    # -- views -------------------------------------------------------------------------------

    def padded(self):
        """``(visit, count)``: the lists as int32 ``(B, H, nq, max_visits)`` padded with -1,
        and the row lengths (cached)."""
        if self._padded is None:
            self._padded = rows_to_padded(self.xp, self.row_offsets, self.row_indices,
                                          self.max_visits)
        return self._padded

    @property
    def visit(self):
        """Padded visit lists ``(B, H, nq, max_visits)``, ``-1`` past each row's length."""
        return self.padded()[0]

    @property
    def count(self):
        """Row lengths ``(B, H, nq)`` (the same as :attr:`counts`)."""
        return self.padded()[1]

    def visit_bitmap(self):
        """bool ``(B, H, nq, nk)``: True where query tile ``i`` visits key tile ``j``."""
        xp = self.xp
        visit, _ = self.padded()
        B, H = self.shape[:2]
        bitmap = xp.zeros((B, H, self.nq, self.nk + 1), dtype=bool)
        slots = xp.where(visit >= 0, visit, self.nk).astype(xp.int64)
        xp.put_along_axis(bitmap, slots, True, axis=-1)
        return bitmap[..., : self.nk]

    def to(self, device):
        """This plan with its arrays on ``device``: ``"host"`` (NumPy) or ``"gpu"`` (CuPy)."""
        if device not in ("host", "gpu"):
            raise ValueError(f"device must be 'host' or 'gpu', got {device!r}")
        if device == "gpu":
            import cupy

            move = cupy.asarray
        else:
            move = lambda x: x.get() if hasattr(x, "get") else np.asarray(x)  # noqa: E731
        if (device == "gpu") == (self.xp is not np):
            return self
        optional = lambda x: None if x is None else move(x)  # noqa: E731
        return Plan(self.shape, self.block, move(self.row_offsets), move(self.row_indices),
                    optional(self._col_offsets), optional(self._col_indices),
                    optional(self.marginal), self.order, self.max_visits, _trusted=True)

    def __repr__(self):
        where = "cupy" if self.xp is not np else "numpy"
        sla = ", marginal" if self.marginal is not None else ""
        return (f"Plan(shape={self.shape}, block={self.block}, tiles={self.nq}x{self.nk}, "
                f"order={self.order!r}, max_visits={self.max_visits}, "
                f"capacity={self.capacity}{sla}, on {where})")

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_kept(cls, kept, *, block, order="given", shape=None):
        """The plan visiting exactly the tiles of a bool bitmap, in ascending order.

        Parameters
        ----------
        kept : bool array ``(B, H, nq, nk)``
            Any tile bitmap, e.g. a forward's ``stats.kept`` (NumPy, CuPy or a DLPack producer).
            Rows with no tile are allowed: the kernels give them O = 0 and LSE = -inf.
        block : (int, int)
            Tile sizes the bitmap was made with.
        order : {"given", "natural"}
            Recorded order; both mean ascending key tiles.
        shape : tuple of int, optional
            ``(B, H, Nq, Nk)``, which tells partial tiles apart; ``(B, H, nq*Bq, nk*Bk)`` when
            omitted.

        Returns
        -------
        Plan
        """
        from ._arrays import as_backend_array, check_block, on_cuda

        block = check_block(block)
        if order not in ("given", "natural"):
            raise ValueError(f"order must be 'given' or 'natural', got {order!r}")
        kept = as_backend_array("kept", kept, on_cuda(kept))
        if kept.dtype != bool:
            raise TypeError(f"kept must be a bool array, got dtype {kept.dtype}")
        if kept.ndim != 4:
            raise ValueError(f"kept must be 4-D (B, H, nq, nk), got shape {tuple(kept.shape)}")
        B, H, nq, nk = (int(s) for s in kept.shape)
        if shape is None:
            shape = (B, H, nq * block[0], nk * block[1])
        shape = _check_shape(shape)
        expected = (shape[0], shape[1], tile_count(shape[2], block[0]),
                    tile_count(shape[3], block[1]))
        if (B, H, nq, nk) != expected:
            raise ValueError(f"kept has shape {(B, H, nq, nk)} but shape {shape} with block "
                             f"{block} needs {expected}")
        xp = _namespace(kept)
        position = xp.cumsum(kept, axis=-1, dtype=xp.int64) - 1
        row_offsets, row_indices = rows_from_positions(xp, kept, position, nq * nk)
        return cls(shape, block, row_offsets, row_indices, order=order, max_visits=nk,
                   _trusted=True)


def trusted_plan(shape, block, row_offsets, row_indices, *, order, max_visits, marginal=None):
    """A plan from the library's own builders (not validated)."""
    return Plan(shape, block, row_offsets, row_indices, None, None, marginal, order, max_visits,
                _trusted=True)


# ---------------------------------------------------------------------------------------------
# Array helpers shared by every builder (NumPy and CuPy; no device-to-host read).


def _offsets(xp, counts):
    """``(..., n + 1)`` int32 offsets of ``(..., n)`` counts, starting at 0."""
    offsets = xp.zeros(counts.shape[:-1] + (counts.shape[-1] + 1,), dtype=xp.int32)
    offsets[..., 1:] = xp.cumsum(counts, axis=-1, dtype=xp.int32)
    return offsets


def rows_from_positions(xp, keep, position, capacity):
    """CSR rows from a bitmap and each kept tile's position within its row.

    ``keep (B, H, n, m)`` bool; ``position`` int in ``[0, count)`` for kept tiles (a permutation
    of each row's kept tiles). Returns int32 ``(B, H, n + 1)`` offsets and ``(B, H, capacity)``
    indices (the column of each entry, ``-1`` past the end).
    """
    B, H, n, m = keep.shape
    counts = keep.sum(axis=-1, dtype=xp.int32)
    offsets = _offsets(xp, counts)
    # Every tile is scattered: the dropped ones into one spare slot past the end.
    target = xp.where(keep, offsets[..., :-1, None].astype(xp.int64) + position, capacity)
    columns = xp.broadcast_to(xp.arange(m, dtype=xp.int32), keep.shape)
    indices = xp.full((B, H, capacity + 1), -1, dtype=xp.int32)
    xp.put_along_axis(indices, target.reshape(B, H, n * m), columns.reshape(B, H, n * m), axis=-1)
    return offsets, xp.ascontiguousarray(indices[..., :capacity])


def rows_from_padded(xp, visit, count):
    """CSR rows from padded lists ``visit (B, H, n, L)`` (``-1`` past ``count``)."""
    B, H, n, L = visit.shape
    offsets = _offsets(xp, count.astype(xp.int32))
    slot = xp.arange(L, dtype=xp.int64)
    target = xp.where(slot < count[..., None], offsets[..., :-1, None].astype(xp.int64) + slot,
                      n * L)
    indices = xp.full((B, H, n * L + 1), -1, dtype=xp.int32)
    xp.put_along_axis(indices, target.reshape(B, H, n * L), visit.reshape(B, H, n * L)
                      .astype(xp.int32), axis=-1)
    return offsets, xp.ascontiguousarray(indices[..., : n * L])


def rows_to_padded(xp, row_offsets, row_indices, width=None):
    """Padded lists ``(B, H, n, width)`` (``-1`` past each row's length) and the lengths."""
    capacity = row_indices.shape[-1]
    n = row_offsets.shape[-1] - 1
    width = int(width) if width is not None else capacity
    count = (row_offsets[..., 1:] - row_offsets[..., :-1]).astype(xp.int32)
    slot = xp.arange(width, dtype=xp.int64)
    source = row_offsets[..., :-1, None].astype(xp.int64) + slot
    valid = slot < count[..., None]
    B, H = row_offsets.shape[:2]
    source = xp.where(valid, source, 0).reshape(B, H, n * width)
    if capacity == 0:
        visit = xp.full((B, H, n, width), -1, dtype=xp.int32)
    else:
        gathered = xp.take_along_axis(row_indices, xp.minimum(source, capacity - 1), axis=-1)
        visit = xp.where(valid, gathered.reshape(B, H, n, width), xp.int32(-1))
    return xp.ascontiguousarray(visit.astype(xp.int32)), xp.ascontiguousarray(count)


def _transpose(plan):
    """The key-major lists of ``plan``: a compaction of the transposed visit bitmap.

    Sizes are the plan's own (``nk + 1`` offsets, ``capacity`` indices), so nothing is read
    back to the host.
    """
    xp = plan.xp
    by_key = xp.swapaxes(plan.visit_bitmap(), 2, 3)           # (B, H, nk, nq)
    position = xp.cumsum(by_key, axis=-1, dtype=xp.int64) - 1
    return rows_from_positions(xp, by_key, position, plan.capacity)


# ---------------------------------------------------------------------------------------------
# Validation of user-constructed plans (once, on the host).


def _check_shape(shape):
    if (not isinstance(shape, (tuple, list)) or len(shape) != 4
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                   for s in shape)):
        raise ValueError(f"shape must be four positive ints (B, H, Nq, Nk), got {shape!r}")
    return tuple(int(s) for s in shape)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _int_array(name, x, shape):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an int32 array, got {type(x).__name__}")
    if x.dtype != np.int32:
        raise ValueError(f"{name} must have dtype int32, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return _host(x)


def _check_lists(prefix, offsets, indices, n_lists, n_targets):
    """Offsets start at 0 and never decrease, fit the capacity; entries in range, -1 after."""
    capacity = indices.shape[-1]
    if np.any(offsets[..., 0] != 0):
        raise ValueError(f"{prefix}_offsets[..., 0] must be 0")
    lengths = np.diff(offsets, axis=-1)
    if np.any(lengths < 0):
        raise ValueError(f"{prefix}_offsets must be non-decreasing")
    total = offsets[..., -1]
    if np.any(total > capacity):
        raise ValueError(f"{prefix}_offsets: a (batch, head) lists {int(total.max())} entries, "
                         f"more than the capacity {capacity} of {prefix}_indices")
    slot = np.arange(capacity)
    used = slot < total[..., None]
    if np.any(used & ((indices < 0) | (indices >= n_targets))):
        raise ValueError(f"{prefix}_indices must hold tiles in [0, {n_targets})")
    if np.any(~used & (indices != -1)):
        raise ValueError(f"{prefix}_indices must be -1 past {prefix}_offsets[..., -1]")
    # No tile twice in one list: mark (list, tile) pairs and compare with the lengths.
    B, H = offsets.shape[:2]
    row = np.zeros(indices.shape, dtype=np.int64)
    starts = offsets[..., 1:-1]
    for b in range(B):
        for h in range(H):
            np.add.at(row[b, h], starts[b, h][starts[b, h] < capacity], 1)
    row = np.cumsum(row, axis=-1)
    marks = np.zeros((B, H, n_lists, n_targets), dtype=np.int64)
    bb, hh, ss = np.nonzero(used)
    np.add.at(marks, (bb, hh, row[bb, hh, ss], indices[bb, hh, ss]), 1)
    if np.any(marks > 1):
        raise ValueError(f"{prefix}_indices lists a tile twice in one list")
    return lengths, marks.astype(bool)


def _validate(plan):
    """Check a user-constructed plan once; ValueError naming the field."""
    plan.shape = _check_shape(plan.shape)
    from ._arrays import check_block

    try:
        plan.block = check_block(plan.block)
    except TypeError as error:
        raise ValueError(f"block: {error}") from error
    if plan.order not in PLAN_ORDERS:
        raise ValueError(f"order must be one of {PLAN_ORDERS}, got {plan.order!r}")
    B, H = plan.shape[:2]
    nq, nk = plan.nq, plan.nk
    if not hasattr(plan.row_indices, "ndim") or plan.row_indices.ndim != 3:
        raise ValueError("row_indices must be an int32 array (B, H, capacity)")
    capacity = int(plan.row_indices.shape[-1])
    device = _namespace(plan.row_offsets)
    for name in ("row_indices", "col_offsets", "col_indices", "marginal"):
        value = getattr(plan, "_" + name if name.startswith("col") else name)
        if value is not None and _namespace(value) is not device:
            raise ValueError(f"{name} must live on the device of row_offsets")
    row_offsets = _int_array("row_offsets", plan.row_offsets, (B, H, nq + 1))
    row_indices = _int_array("row_indices", plan.row_indices, (B, H, capacity))
    lengths, bitmap = _check_lists("row", row_offsets, row_indices, nq, nk)
    if plan.max_visits is None:
        plan.max_visits = nk
    if isinstance(plan.max_visits, bool) or not isinstance(plan.max_visits, (int, np.integer)):
        raise ValueError(f"max_visits must be an int, got {plan.max_visits!r}")
    plan.max_visits = int(plan.max_visits)
    if not 0 <= plan.max_visits <= nk:
        raise ValueError(f"max_visits must be in [0, nk = {nk}], got {plan.max_visits}")
    if lengths.size and int(lengths.max()) > plan.max_visits:
        raise ValueError(f"max_visits = {plan.max_visits} but a row visits "
                         f"{int(lengths.max())} tiles")
    if (plan._col_offsets is None) != (plan._col_indices is None):
        raise ValueError("col_offsets and col_indices must be given together (or neither)")
    if plan._col_offsets is not None:
        col_offsets = _int_array("col_offsets", plan._col_offsets, (B, H, nk + 1))
        col_indices = _int_array("col_indices", plan._col_indices, (B, H, capacity))
        _, by_key = _check_lists("col", col_offsets, col_indices, nk, nq)
        if not np.array_equal(by_key, np.swapaxes(bitmap, 2, 3)):
            raise ValueError("col_offsets/col_indices must be the key-major transpose of the "
                             "row lists")
        ascending = np.diff(col_indices, axis=-1) > 0
        slot = np.arange(1, capacity)
        inside = slot[None, None, :] < col_offsets[..., -1:]
        starts = np.zeros((B, H, capacity), dtype=bool)
        for b in range(B):
            for h in range(H):
                starts[b, h, col_offsets[b, h][col_offsets[b, h] < capacity]] = True
        if np.any(inside & ~starts[..., 1:] & ~ascending):
            raise ValueError("col_indices must list each key tile's query tiles ascending")
    if plan.marginal is not None:
        marginal = plan.marginal
        if getattr(marginal, "dtype", None) != bool or tuple(marginal.shape) != (B, H, nq, nk):
            raise ValueError(f"marginal must be a bool array of shape {(B, H, nq, nk)}")


# ---------------------------------------------------------------------------------------------
# Block scores and the selection methods (docs/design.rst sections 3 and 4).


def pool_tiles(xp, x, b):
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
    """Block scores ``S_IJ = scale * qbar_I . (kbar_J - mean_J kbar_J)`` of docs/design.rst section 3.

    ``q (B, Hq, Nq, D)`` and ``k (B, Hkv, Nk, D)`` are floating arrays of namespace ``xp``;
    the result has shape ``(B, Hq, nq, nk)``, float64 for float64 inputs, float32 otherwise.
    """
    Bq, Bk = block
    group = q.shape[1] // k.shape[1]
    qbar = pool_tiles(xp, q, Bq)
    kbar = pool_tiles(xp, k, Bk)
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


def _positions(xp, keep, rank, order, peak, sorted_idx=None):
    """Each kept tile's position in its row's visit list (docs/design.rst section 4 orders).

    ``sorted_idx``, the tiles in descending score order (the inverse permutation of ``rank``,
    as :func:`_descending_rank` gives both), spares a second sort.
    """
    if order == "natural":
        return xp.cumsum(keep, axis=-1, dtype=xp.int64) - 1
    if sorted_idx is None:
        sorted_idx = xp.argsort(rank, axis=-1)
    # Rank among the kept tiles only (a mask may keep tiles of any rank).
    kept_sorted = xp.take_along_axis(keep, sorted_idx, axis=-1)
    kept_rank_sorted = xp.cumsum(kept_sorted, axis=-1, dtype=xp.int64) - 1
    kept_rank = xp.take_along_axis(kept_rank_sorted, rank, axis=-1)
    if order == "score":
        return kept_rank
    count = keep.sum(axis=-1, dtype=xp.int64)[..., None]
    return xp.where(kept_rank < peak, kept_rank, peak + (count - 1 - kept_rank))


def max_visits_of(selector, nk: int) -> int:
    """The static bound on a row's length for ``selector`` with ``nk`` key tiles."""
    if isinstance(selector, TopK):
        return selector.count(nk)
    if isinstance(selector, SlaSplit):
        return selector.counts(nk)[0]
    return nk


def build_plan(xp, q, k, selector, order, peak, block, scale, linear="marginal", *,
               mask=None, scores=None):
    """Build the :class:`Plan` of ``selector`` (or dense when ``None``) for canonical q, k.

    ``selector`` is ``None``, :class:`BlockMask`, :class:`TopK`, :class:`TopP` or the internal
    :class:`SlaSplit`; ``order`` one of ``"natural"``, ``"score"``, ``"peak"``. No value is read
    back from the device: the index capacity is ``nq * max_visits``.

    Library-internal callers may pass ``mask``, a bool ``(B, H, nq, nk)`` bitmap of the array
    namespace, with ``selector=None``: the plan visits exactly its tiles (what
    ``BlockMask(mask)`` gives, without the mask's checks, which read device data), and
    ``scores``, the block scores (:func:`block_scores`) when the caller has them already.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    shape = (B, H, nq, nk)
    marginal = None
    needs_scores = order != "natural" or isinstance(selector, (TopK, TopP, SlaSplit))
    if needs_scores:
        if scores is None:
            scores = block_scores(xp, q, k, block, scale)
        sorted_idx, rank = _descending_rank(xp, scores)
    else:
        rank = sorted_idx = None

    if mask is not None:
        keep = mask
    elif selector is None:
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
        marginal = sla_marginal(xp, keep, rank, nk - n_negligible, linear)
    else:
        raise TypeError("select must be None, BlockMask, TopK or TopP, got "
                        f"{type(selector).__name__}")

    width = max_visits_of(selector, nk)
    position = _positions(xp, keep, rank, order, peak, sorted_idx)
    row_offsets, row_indices = rows_from_positions(xp, keep, position, nq * width)
    return trusted_plan((B, H, Nq, Nk), block, row_offsets, row_indices, order=order,
                        max_visits=width, marginal=marginal)


def sla_marginal(xp, keep, rank, marginal_end, linear):
    """SLA's linear-branch tiles: ranks in ``[critical, marginal_end)`` ("marginal"), every
    non-critical tile ("complement"), or all ("global")."""
    if linear == "marginal":
        return ~keep & (rank < marginal_end)
    if linear == "complement":
        return ~keep
    return xp.ones(keep.shape, dtype=bool)
