"""The float64 reference as a backend (any tile size, host arrays)."""

from .. import _reference
# Re-exported: these three are the contract functions as they stand.
from .._reference import attention_backward, linear_backward, linear_branch  # noqa: F401


def forward(q, k, v, plan, rule, scale, want_stats=True, out_dtype=None):
    """The reference forward; ``out`` in ``out_dtype`` (default the input dtype), stats float64.

    ``rule`` is a SkipRule or None; ``want_stats`` is accepted for the contract (the reference
    always computes its stats).
    """
    out, lse, kept, visited, bound = _reference.forward(q, k, v, plan, rule, scale)
    return out.astype(q.dtype if out_dtype is None else out_dtype, copy=False), lse, kept, \
        visited, bound


def available() -> bool:
    return True


def supported_blocks():
    """Any positive tile sizes."""
    return None
