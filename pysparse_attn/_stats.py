"""What a call did: per-row statistics and per-tile bitmaps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["AttentionStats"]


@dataclass
class AttentionStats:
    """Statistics of one attention call (``return_stats=True``).

    Arrays are in the namespace of the inputs.

    Attributes
    ----------
    lse : array ``(B, H, Nq)``
        Log-sum-exp of each row over the keys whose P.V was accumulated (float32; float64 on the
        reference backend).
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
    density, sparsity : float
        Share of tiles kept / not kept, over all (batch, head, query tile, key tile).
    flop_density, flop_sparsity : float
        Share of dense-equivalent FLOPs spent / saved, counting partial tiles by their valid
        size, QK^T on every visited tile and P.V on every kept tile.
    bounded : bool
        True when ``recall_bound`` bounds the full-row recall: the plan visits every key tile
        of every query tile (no selector, or one that kept everything).
    plan : Plan
        The plan the kernel consumed (visit lists), for introspection.
    """

    lse: Any
    kept: Any
    visited: Any
    recall_bound: Any
    density: float
    sparsity: float
    flop_density: float
    flop_sparsity: float
    bounded: bool
    marginal: Optional[Any] = None
    plan: Any = field(default=None, repr=False)

    def __repr__(self):
        # Short on purpose: shapes and a few scalars, never whole arrays. The two reductions
        # of recall_bound are the only device work (and host sync) a GPU repr costs.
        def shape(x):
            return "None" if x is None else "x".join(str(int(n)) for n in x.shape)

        text = (f"AttentionStats(rows (B,H,Nq)={shape(self.lse)}, "
                f"tiles (B,H,nq,nk)={shape(self.kept)}, "
                f"sparsity={self.sparsity:.1%}, flop_sparsity={self.flop_sparsity:.1%}")
        if self.recall_bound is not None:
            text += (f", recall_bound min/mean={float(self.recall_bound.min()):.4f}/"
                     f"{float(self.recall_bound.mean()):.4f}"
                     f"{'' if self.bounded else ' (visited tiles only)'}")
        if self.marginal is not None:
            text += ", marginal tiles"
        return text + ")"
