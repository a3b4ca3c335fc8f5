"""The float64 reference as a backend (any tile size, host arrays)."""

from .. import _reference
from . import add_gradients


def forward(q, k, v, plan, rule, scale, want_stats=True, out_dtype=None):
    """The reference forward; ``out`` in ``out_dtype`` (default the input dtype), stats float64.

    ``rule`` is a SkipRule or None; ``want_stats`` is accepted for the contract (the reference
    always computes its stats).
    """
    out, lse, kept, visited, bound = _reference.forward(q, k, v, plan, rule, scale)
    return out.astype(q.dtype if out_dtype is None else out_dtype, copy=False), lse, kept, \
        visited, bound


def attention_backward(q, k, v, do, kept, block, scale, *, out=None, lse=None,
                       deterministic=False, grad_dtype=None, addend=None, density=None):
    """``(dq, dk, dv)`` in float64 (:func:`pysparse_attn._reference.attention_backward`),
    plus ``addend`` (another branch's gradients) where given.

    The oracle recomputes the output and LSE of the kept set in float64 whatever is given:
    ``out`` and ``lse`` (saved tensors of a lower precision) are accepted and ignored, as are
    ``deterministic`` (NumPy's float64 products are already reproducible run to run),
    ``grad_dtype`` (the API rounds the float64 gradients once) and ``density`` (the GPU
    backend's kernel choice).
    """
    return add_gradients(_reference.attention_backward(q, k, v, do, kept, block, scale), addend)


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

