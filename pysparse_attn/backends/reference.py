"""The float64 reference as a backend (any tile size, host arrays)."""

from .. import _reference
# Re-exported: the contract function as it stands.
from .._reference import attention_backward  # noqa: F401


def forward(q, k, v, plan, rule, scale, want_stats=True, out_dtype=None):
    """The reference forward; ``out`` in ``out_dtype`` (default the input dtype), stats float64.

    ``rule`` is a SkipRule or None; ``want_stats`` is accepted for the contract (the reference
    always computes its stats).
    """
    out, lse, kept, visited, bound = _reference.forward(q, k, v, plan, rule, scale)
    return out.astype(q.dtype if out_dtype is None else out_dtype, copy=False), lse, kept, \
        visited, bound


def linear_branch(q, k, v, marginal, block, feature_map, eps, mode=None, method="direct"):
    """``O_l`` in float64 (:func:`pysparse_attn.branches.linear.linear_attention`).

    ``mode`` (the SLA ``linear`` option) changes nothing here: the marginal set says it all.
    """
    return _reference.linear_branch(q, k, v, marginal, block, feature_map, eps, method)


def linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, mode=None):
    """``(dq, dk, dv)`` of :func:`linear_branch` in float64."""
    return _reference.linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear)


def available() -> bool:
    return True


def supported_blocks():
    """Any positive tile sizes."""
    return None

