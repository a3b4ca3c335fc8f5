"""The float64 reference as a backend (any tile size, host arrays)."""

from .. import _reference
# Re-exported: these three are the contract functions as they stand.
from .._reference import attention_backward, linear_backward, linear_branch  # noqa: F401


def forward(q, k, v, plan, rule_code, rule_param, scale, want_stats=True):
    """The reference forward; ``out`` in the input dtype, stats in float64."""
    out, lse, kept, visited, bound = _reference.forward(q, k, v, plan, rule_code, rule_param,
                                                        scale)
    return out.astype(q.dtype, copy=False), lse, kept, visited, bound


def available() -> bool:
    return True


def supported_blocks():
    """Any positive tile sizes."""
    return None
