"""Skip rules: predicates on the online-softmax state that let a kernel skip a key tile.

Each rule is plain data. Backends only see ``(code, param)``; see ``docs/internals.rst``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

__all__ = ["Blasst", "Cef", "Recall", "SkipRule", "rule_code"]

NO_SKIP = 0
BLASST = 1
CEF = 2
RECALL = 3
RECALL_EXACT = 4


def real_number(name, value):
    """``value`` as a finite float, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class SkipRule(abc.ABC):
    """Base class of the in-loop skip rules."""

    code: int

    @property
    @abc.abstractmethod
    def param(self) -> float:
        """The one float the kernels read (see the backend contract)."""


@dataclass(frozen=True)
class Blasst(SkipRule):
    """Skip a key tile when its max logit is far below the running max (BLASST).

    Row ``i`` may skip tile ``J`` when ``max_j s_ij - m_i < ln(lam)``.

    Parameters
    ----------
    lam : float
        Threshold in ``(0, 1]`` on ``exp(max_j s_ij - m_i)``. Typical values 1e-4 .. 1e-2.
    """

    lam: float
    code = BLASST

    def __post_init__(self):
        lam = real_number("lam", self.lam)
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must be in (0, 1], got {lam}")
        object.__setattr__(self, "lam", lam)

    @property
    def param(self) -> float:
        return math.log(self.lam)


@dataclass(frozen=True)
class Cef(SkipRule):
    """Cumulative energy filtering: compare the tile max with the running log-sum-exp.

    Row ``i`` may skip tile ``J`` when ``max_j s_ij - (m_i + ln l_i) < lam``.

    Parameters
    ----------
    lam : float
        Threshold, a natural logarithm (negative; e.g. -8.5). See :meth:`from_mass`.
    """

    lam: float
    code = CEF

    def __post_init__(self):
        lam = real_number("lam", self.lam)
        if lam > 0.0:
            raise ValueError(f"lam must be <= 0 (a log of a mass share), got {lam}")
        object.__setattr__(self, "lam", lam)

    @classmethod
    def from_mass(cls, p: float, block_k: int, n_keys: int) -> "Cef":
        """Threshold that skips a tile whose keys would each hold < ``p`` of a uniform share.

        Returns ``Cef(ln p + ln(block_k / n_keys))``.

        Parameters
        ----------
        p : float
            Mass fraction in ``(0, 1]``.
        block_k : int
            Key tile size.
        n_keys : int
            Number of keys ``Nk``.
        """
        p = real_number("p", p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if int(block_k) < 1 or int(n_keys) < 1:
            raise ValueError(f"block_k and n_keys must be >= 1, got {block_k}, {n_keys}")
        return cls(min(0.0, math.log(p) + math.log(block_k / n_keys)))

    @property
    def param(self) -> float:
        return self.lam


@dataclass(frozen=True)
class Recall(SkipRule):
    """Certified recall: skip while the bound on skipped mass stays within ``1 - target``.

    Row ``i`` may skip tile ``J`` when ``u_i + n_J exp(max_j s_ij - m_i) <= (1-R)/R * l_i``,
    where ``u_i`` bounds the mass already skipped. Every row then keeps at least ``target`` of
    the softmax mass of the visited tiles (all tiles when no selector is given).

    Parameters
    ----------
    target : float
        Recall ``R`` in ``(0, 1]``; ``1`` never skips.
    exact : bool
        Use the tile's exact row sums instead of the bound ``n_J exp(max - m)``: computes the
        tile's exponentials (saves only P.V) but skips more.
    """

    target: float
    exact: bool = False

    def __post_init__(self):
        target = real_number("target", self.target)
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {target}")
        if not isinstance(self.exact, bool):
            raise TypeError(f"exact must be a bool, got {type(self.exact).__name__}")
        object.__setattr__(self, "target", target)

    @property
    def code(self) -> int:
        return RECALL_EXACT if self.exact else RECALL

    @property
    def param(self) -> float:
        return (1.0 - self.target) / self.target


def rule_code(skip) -> tuple[int, float]:
    """``(code, param)`` of a skip rule or ``None`` (validated)."""
    if skip is None:
        return NO_SKIP, 0.0
    if not isinstance(skip, SkipRule):
        raise TypeError(f"skip must be Blasst, Cef, Recall or None, got {type(skip).__name__}")
    return int(skip.code), float(skip.param)
