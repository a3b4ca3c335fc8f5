"""Selectors: which key tiles each query tile visits (the plan stage's policy, plain data)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ._rules import real_number

__all__ = ["BlockMask", "TopK", "TopP", "Selector"]


class Selector:
    """Base class of the plan-stage selectors."""


@dataclass(frozen=True, eq=False)
class BlockMask(Selector):
    """Visit exactly the tiles where a user mask is true.

    Parameters
    ----------
    mask : array of bool
        Shape ``(B, H, nq, nk)`` or anything broadcastable to it (``(nq, nk)`` for one mask
        shared by every head). Every query tile needs at least one true tile (checked for host
        arrays; on GPU arrays, where checking would synchronise, a query tile with none gives
        O = 0 and LSE = -inf). Pass a GPU mask with GPU inputs: a host mask is copied over on
        every call.
    """

    mask: Any


@dataclass(frozen=True)
class TopK(Selector):
    """Keep the ``k`` key tiles of highest block score per query tile.

    Give exactly one of ``k`` or ``ratio``. ``ratio`` gives ``k = floor(ratio * nk)``, at least
    one; ``k`` larger than ``nk`` keeps every tile.

    Parameters
    ----------
    k : int, optional
        Number of key tiles, ``>= 1``.
    ratio : float, optional
        Share of key tiles in ``(0, 1]``.
    """

    k: Optional[int] = None
    ratio: Optional[float] = None

    def __post_init__(self):
        if (self.k is None) == (self.ratio is None):
            raise ValueError("TopK needs exactly one of k or ratio")
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, int):
                raise TypeError(f"k must be an int, got {type(self.k).__name__}")
            if self.k < 1:
                raise ValueError(f"k must be >= 1, got {self.k}")
        else:
            ratio = _share("ratio", self.ratio)
            object.__setattr__(self, "ratio", ratio)

    def count(self, nk: int) -> int:
        """Tiles kept per query tile when there are ``nk`` key tiles."""
        if self.k is not None:
            return min(nk, self.k)
        return min(nk, max(1, math.floor(self.ratio * nk)))


@dataclass(frozen=True)
class TopP(Selector):
    """Keep the smallest set of key tiles whose estimated mass reaches ``p``.

    Tiles are taken by descending estimated mass ``softmax_J(S_IJ)`` of the block scores.

    Parameters
    ----------
    p : float
        Mass in ``(0, 1]``.
    """

    p: float

    def __post_init__(self):
        object.__setattr__(self, "p", _share("p", self.p))


@dataclass(frozen=True)
class SlaSplit(Selector):
    """SLA's three-way split of key tiles into critical, marginal and negligible (internal)."""

    critical: float
    negligible: float

    def __post_init__(self):
        object.__setattr__(self, "critical", _share("critical", self.critical))
        negligible = real_number("negligible", self.negligible)
        if not 0.0 <= negligible < 1.0:
            raise ValueError(f"negligible must be in [0, 1), got {negligible}")
        object.__setattr__(self, "negligible", negligible)

    def counts(self, nk: int) -> tuple[int, int]:
        """``(critical, negligible)`` tile counts for ``nk`` key tiles."""
        return max(1, math.floor(self.critical * nk)), math.floor(self.negligible * nk)


def _share(name, value):
    value = real_number(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value
