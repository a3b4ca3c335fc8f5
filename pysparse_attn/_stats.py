"""What a call did: per-row statistics and per-tile bitmaps."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["AttentionStats"]


def _namespace(x):
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy


class AttentionStats:
    """Statistics of one attention call (``return_stats=True``).

    Arrays are in the namespace of the inputs. The float summaries (``density`` and the
    others) and ``bounded`` are computed on first access: reading one of them from a GPU call
    synchronises with the device once; building the stats never does.

    Attributes
    ----------
    lse : array ``(B, H, Nq)``
        Log-sum-exp of each row over the keys whose P.V was accumulated (float32; float64 on the
        reference backend); ``-inf`` for a row whose query tile visits nothing.
    kept : bool array ``(B, H, nq, nk)``
        Tiles whose P.V was accumulated.
    visited : bool array ``(B, H, nq, nk)``
        Tiles whose QK^T was computed (kept or skipped in the loop).
    marginal : bool array ``(B, H, nq, nk)`` or None
        SLA: tiles sent to the linear branch.
    recall_bound : array ``(B, H, Nq)``
        Certified lower bound ``l / (l + u)`` on each row's kept share of the *visited* mass
        (1 where nothing was skipped). Equals a bound on the full-row recall when every tile is
        visited (no selector).
    plan : Plan
        The plan the call used (pass it back as ``attention(..., plan=stats.plan)``).
    density, sparsity : float
        Share of tiles kept / not kept, over all (batch, head, query tile, key tile).
    flop_density, flop_sparsity : float
        Share of dense-equivalent FLOPs spent / saved, counting partial tiles by their valid
        size, QK^T on every visited tile and P.V on every kept tile.
    bounded : bool
        True when ``recall_bound`` bounds the full-row recall: the plan visits every key tile
        of every query tile (no selector, or one that kept everything).
    """

    def __init__(self, lse, kept, visited, recall_bound, marginal: Optional[Any] = None,
                 plan: Any = None, *, lengths=None, block=None, tiles=None):
        self.lse = lse
        self.kept = kept
        self.visited = visited
        self.recall_bound = recall_bound
        self.marginal = marginal
        self.plan = plan
        # (Nq, Nk) and (Bq, Bk) of the call, for the FLOP shares; the plan's by default.
        self._lengths = lengths if lengths is not None else plan.shape[2:]
        self._block = block if block is not None else plan.block
        # kept and visited as NumPy/CuPy arrays (the caller's may be torch or JAX tensors).
        self._tiles = tiles if tiles is not None else (kept, visited)
        self._cache = {}

    def _lazy(self, name, compute):
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    @property
    def density(self) -> float:
        return self._lazy("density", lambda: float(self._tiles[0].mean()))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def flop_density(self) -> float:
        return self._lazy("flop_density", self._flop_density)

    @property
    def flop_sparsity(self) -> float:
        return 1.0 - self.flop_density

    @property
    def bounded(self) -> bool:
        def compute():
            plan = self.plan
            return bool((plan.counts == plan.nk).all())
        return self._lazy("bounded", compute)

    def _flop_density(self):
        """Dense-equivalent FLOP share spent: QK^T on visited tiles, P.V on kept tiles."""
        kept, visited = self._tiles
        xp = _namespace(kept)
        (n_q, n_k), (bq, bk) = self._lengths, self._block
        rows = xp.full((kept.shape[2],), float(bq))
        rows[-1] = n_q - (kept.shape[2] - 1) * bq
        keys = xp.full((kept.shape[3],), float(bk))
        keys[-1] = n_k - (kept.shape[3] - 1) * bk
        area = rows[:, None] * keys[None, :]
        spent = (visited * area).sum() + (kept * area).sum()
        return float(spent) / (2.0 * kept.shape[0] * kept.shape[1] * n_q * n_k)

    def __repr__(self):
        shape = tuple(self.kept.shape)
        sla = ", marginal" if self.marginal is not None else ""
        return f"AttentionStats(tiles={shape}{sla}, plan={self.plan!r})"
