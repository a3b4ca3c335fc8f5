"""Skip rules: predicates on the online-softmax state that let a kernel skip a key tile.

Each rule is defined once, here: its validation, its parameter (a scalar, or one value per query
head), the reference predicate (as a *margin*, below) and the name of the functor that carries
the same predicate in C++ and CUDA (``gpu/skip_rules.cuh``, shared by both). Backends receive
the rule object itself and ask it for :meth:`SkipRule.kernel_params` and its functor name; no
integer codes. ``docs/internals.rst`` lists the files a new rule touches.

The margin of a rule for one row is ``log(threshold) - log(statistic)`` in natural-log units:
the row may skip the tile when the margin is positive (``>= 0`` for rules whose
``skip_at_zero`` is true). Margins make decisions comparable across backends: two backends may
disagree only where a margin is within rounding of zero.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "Blasst",
    "Cef",
    "Recall",
    "SkipRule",
    "RULES",
    "ALL_FUNCTORS",
    "NO_SKIP_FUNCTOR",
    "rule_functor",
    "check_rule",
    "no_skip_margin",
]

#: Functor of "no rule" (never skips) in gpu/skip_rules.cuh.
NO_SKIP_FUNCTOR = "psa::NoSkip"


def real_number(name, value):
    """``value`` as a finite float, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _parameter(name, value, check):
    """A scalar parameter as a float, or a per-head one as a read-only float64 ``(H,)`` array.

    ``check(name, float)`` validates one value (raising ValueError); every element of a
    per-head array is checked. Device arrays (CuPy, torch, JAX) are read to the host once, here,
    at construction, never inside a call.
    """
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        value = real_number(name, value)
        check(name, value)
        return value
    if value is None or isinstance(value, (str, bytes)) or not (
            hasattr(value, "__len__") or hasattr(value, "__array__") or hasattr(value, "get")):
        raise TypeError(f"{name} must be a real number or a 1-D array of one value per head, "
                        f"got {type(value).__name__}")
    host = value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) else value
    try:
        array = np.asarray(host)
    except Exception as error:  # an object NumPy cannot view
        raise TypeError(f"{name} must be a real number or a 1-D array of one value per head, "
                        f"got {type(value).__name__}") from error
    if array.ndim == 0 and array.dtype.kind in "fiu":
        return _parameter(name, array.item(), check)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a real number or a 1-D array of one value per head, "
                         f"got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = np.array(array, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array}")
    for item in array:
        check(name, float(item))
    array.setflags(write=False)
    return array


def _per_head(name, value, heads, transform):
    """``transform(value)`` broadcast to ``(heads,)`` float64; a length mismatch names ``skip``."""
    if isinstance(value, np.ndarray):
        if value.shape[0] != heads:
            raise ValueError(f"skip: {name} has {value.shape[0]} per-head values but the query "
                             f"has {heads} heads")
        return np.asarray(transform(value), dtype=np.float64)
    return np.full((heads,), transform(value), dtype=np.float64)


def _as_key(value):
    return tuple(value.tolist()) if isinstance(value, np.ndarray) else value


# Reference predicates as margins (natural-log units), Numba-compatible plain functions.
# Arguments, per row: tile_max = max_j s_ij over the tile's valid keys; m, l = running max and
# sum; u = bound on the skipped mass (frame of l); added = the tile's mass bound
# n_J * exp(tile_max - m) (or its exact sum for rules with exact_mass); param = kernel_params[h].

def no_skip_margin(tile_max, m, l, u, added, param):
    return -math.inf


def _blasst_margin(tile_max, m, l, u, added, param):
    return param - (tile_max - m)


def _cef_margin(tile_max, m, l, u, added, param):
    return param - (tile_max - m - math.log(l))


def _recall_margin(tile_max, m, l, u, added, param):
    limit = param * l
    if limit <= 0.0:
        return -math.inf
    if added + u <= 0.0:
        return math.inf
    return math.log(limit) - math.log(u + added)


class SkipRule(abc.ABC):
    """Base class of the in-loop skip rules.

    Class attributes every rule defines: ``needs_row_sum`` (the predicate reads l, so kernels
    reduce it every tile), ``skip_at_zero`` (a zero margin allows the skip) and ``margin`` (the
    reference predicate). ``functor`` and ``exact_mass`` may depend on the instance.
    """

    needs_row_sum: ClassVar[bool]
    skip_at_zero: ClassVar[bool] = False
    margin: ClassVar[Any]

    @property
    @abc.abstractmethod
    def functor(self) -> str:
        """The C++/CUDA functor type of ``gpu/skip_rules.cuh`` implementing this rule."""

    @property
    def exact_mass(self) -> bool:
        """Whether ``added`` is the tile's exact row mass instead of the bound."""
        return False

    @abc.abstractmethod
    def kernel_params(self, heads: int) -> np.ndarray:
        """The contract parameter per query head, float64 ``(heads,)``, natural-log units."""

    @property
    def per_head(self) -> bool:
        """Whether the parameter was given per head."""
        return any(isinstance(value, np.ndarray) for value in self._fields())

    def _fields(self):
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)

    def __eq__(self, other):
        return type(self) is type(other) and tuple(map(_as_key, self._fields())) == tuple(
            map(_as_key, other._fields()))

    def __hash__(self):
        return hash((type(self).__name__, tuple(map(_as_key, self._fields()))))

    @classmethod
    def functors(cls) -> tuple:
        """Every functor name instances of this class can have (for the kernel tables)."""
        return (cls.functor_name,)


def _check_lam_blasst(name, lam):
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {lam}")


def _check_lam_cef(name, lam):
    if lam > 0.0:
        raise ValueError(f"{name} must be <= 0 (a log of a mass share), got {lam}")


def _check_target(name, target):
    if not 0.0 < target <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {target}")


@dataclass(frozen=True, eq=False)
class Blasst(SkipRule):
    """Skip a key tile when its max logit is far below the running max (BLASST).

    Row ``i`` may skip tile ``J`` when ``max_j s_ij - m_i < ln(lam)``.

    Parameters
    ----------
    lam : float or array ``(H,)``
        Threshold in ``(0, 1]`` on ``exp(max_j s_ij - m_i)``, one for all heads or one per
        query head (as calibrated by :func:`~pysparse_attn.calibrate_blasst`). Typical values
        1e-4 .. 1e-2.
    """

    lam: Any
    functor_name: ClassVar[str] = "psa::BlasstRule"
    needs_row_sum: ClassVar[bool] = False
    margin: ClassVar[Any] = staticmethod(_blasst_margin)

    def __post_init__(self):
        object.__setattr__(self, "lam", _parameter("lam", self.lam, _check_lam_blasst))

    @property
    def functor(self) -> str:
        return self.functor_name

    def kernel_params(self, heads: int) -> np.ndarray:
        return _per_head("lam", self.lam, heads, np.log)


@dataclass(frozen=True, eq=False)
class Cef(SkipRule):
    """Cumulative energy filtering: compare the tile max with the running log-sum-exp.

    Row ``i`` may skip tile ``J`` when ``max_j s_ij - (m_i + ln l_i) < lam``.

    Parameters
    ----------
    lam : float or array ``(H,)``
        Threshold, a natural logarithm (``<= 0``; e.g. -8.5), one for all heads or one per
        query head. See :meth:`from_mass`.
    """

    lam: Any
    functor_name: ClassVar[str] = "psa::CefRule"
    needs_row_sum: ClassVar[bool] = True
    margin: ClassVar[Any] = staticmethod(_cef_margin)

    def __post_init__(self):
        object.__setattr__(self, "lam", _parameter("lam", self.lam, _check_lam_cef))

    @classmethod
    def from_mass(cls, p, block_k: int, n_keys: int) -> "Cef":
        """Threshold that skips a tile whose keys would each hold < ``p`` of a uniform share.

        Returns ``Cef(ln p + ln(block_k / n_keys))``.

        Parameters
        ----------
        p : float or array ``(H,)``
            Mass fraction in ``(0, 1]``.
        block_k : int
            Key tile size.
        n_keys : int
            Number of keys ``Nk``.
        """
        p = _parameter("p", p, _check_target)
        if int(block_k) < 1 or int(n_keys) < 1:
            raise ValueError(f"block_k and n_keys must be >= 1, got {block_k}, {n_keys}")
        lam = np.minimum(0.0, np.log(p) + math.log(block_k / n_keys))
        return cls(float(lam) if np.ndim(lam) == 0 else lam)

    @property
    def functor(self) -> str:
        return self.functor_name

    def kernel_params(self, heads: int) -> np.ndarray:
        return _per_head("lam", self.lam, heads, lambda lam: lam)


@dataclass(frozen=True, eq=False)
class Recall(SkipRule):
    """Certified recall: skip while the bound on skipped mass stays within ``1 - target``.

    Row ``i`` may skip tile ``J`` when ``u_i + n_J exp(max_j s_ij - m_i) <= (1-R)/R * l_i``,
    where ``u_i`` bounds the mass already skipped. Every row then keeps at least ``target`` of
    the softmax mass of the visited tiles (all tiles when no selector is given).

    Parameters
    ----------
    target : float or array ``(H,)``
        Recall ``R`` in ``(0, 1]``, one for all heads or one per query head; ``1`` never skips.
    exact : bool
        Use the tile's exact row sums instead of the bound ``n_J exp(max - m)``: computes the
        tile's exponentials (saves only P.V) but skips more.
    """

    target: Any
    exact: bool = False
    functor_name: ClassVar[str] = "psa::RecallRule"
    exact_functor_name: ClassVar[str] = "psa::RecallExactRule"
    needs_row_sum: ClassVar[bool] = True
    skip_at_zero: ClassVar[bool] = True
    margin: ClassVar[Any] = staticmethod(_recall_margin)

    def __post_init__(self):
        object.__setattr__(self, "target", _parameter("target", self.target, _check_target))
        if not isinstance(self.exact, bool):
            raise TypeError(f"exact must be a bool, got {type(self.exact).__name__}")

    @property
    def functor(self) -> str:
        return self.exact_functor_name if self.exact else self.functor_name

    @property
    def exact_mass(self) -> bool:
        return self.exact

    @classmethod
    def functors(cls) -> tuple:
        return (cls.functor_name, cls.exact_functor_name)

    def kernel_params(self, heads: int) -> np.ndarray:
        return _per_head("target", self.target, heads, lambda r: (1.0 - r) / r)


#: The rule classes, in the order documentation and tables list them.
RULES = (Blasst, Cef, Recall)

#: Every functor name a call can need (no rule first): what the kernel instance tables iterate.
ALL_FUNCTORS = (NO_SKIP_FUNCTOR,) + tuple(name for rule in RULES for name in rule.functors())


def check_rule(skip):
    """``skip`` itself when it is None or a rule, else a TypeError naming ``skip``."""
    if skip is not None and not isinstance(skip, SkipRule):
        names = ", ".join(rule.__name__ for rule in RULES)
        raise TypeError(f"skip must be {names} or None, got {type(skip).__name__}")
    return skip


def rule_functor(skip) -> str:
    """The functor name of a rule, or of "no rule" for None."""
    return NO_SKIP_FUNCTOR if check_rule(skip) is None else skip.functor


def rule_margin(skip):
    """The reference margin function of a rule (never skips for None)."""
    return no_skip_margin if check_rule(skip) is None else skip.margin
