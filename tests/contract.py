"""The backend contract of docs/design.rst section 8, checked the same way for every backend.

A backend's forward is judged against the float64 reference in two parts: (a) its output and
LSE equal exact attention restricted to the kept set the backend itself reports
(``_reference.masked_attention``), within its dtype's tolerance; (b) each of its keep/skip
decisions agrees with the rule, replayed in float64 along the same decisions
(``_reference.decision_slack``), except within a small margin of the threshold, where float32
and float64 may legitimately decide differently. Everything else a kernel promises (inputs
untouched, every output written, visited = the plan's lists, the first tile of a list kept, no
rule -> nothing skipped) is checked alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import ml_dtypes
import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn import _reference

DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


@dataclass(frozen=True)
class Tolerance:
    """Output tolerance of one dtype: elementwise ``(rtol, atol)`` and a relative L2 bound."""

    rtol: float
    atol: float
    rel_l2: float


# Output vs exact attention on the same rounded inputs and the same kept set. Values of O are
# convex combinations of unit-variance v, so |O| <= ~4.
OUTPUT_TOLERANCE = {
    # Two float64 evaluations differing in summation order: ~N * 2**-52 ~ 5e-14 for N <= 300.
    "float64": Tolerance(1e-10, 1e-10, 1e-10),
    # float32 accumulation over <= 300 keys: ~sqrt(N) 2**-24 |logit| ~ 1e-5 (plus logit_error).
    "float32": Tolerance(3e-5, 3e-5, 1e-4),
    # Host backends round O once to the dtype (half an ulp, 2**-11; twice for margin) times
    # |O|. The GPU also rounds P to the 16-bit type before P.V (tensor cores): ~5e-4 per
    # element, which only the relative L2 bound (3e-3) absorbs.
    "float16": Tolerance(2e-3, 4e-3, 3e-3),
    # Same with bfloat16's 8-bit significand (ulp 2**-7; P rounded: ~4e-3 per element).
    "bfloat16": Tolerance(1.6e-2, 3.2e-2, 1.5e-2),
}
# LSE from exact inputs: float64 as the output; fp32 accumulation and log: 3e-5 relative and
# absolute (|lse| <= ~50) plus logit_error. The GPU's exp2/log2 are the approximate PTX ones
# (2**-22 relative each) on logits in log2 units: 2e-3 absolute.
LSE_TOLERANCE = {"float64": (1e-10, 1e-10), "accumulated": (3e-5, 3e-5), "approximate": 2e-3}
# Margin, natural-log units, within which a decision may differ from float64's: logits of
# magnitude <= ~40 carry float32 rounding ~40 * 2**-23 ~ 5e-6, l and u sums ~1e-6 relative;
# 2e-3 leaves a wide margin while still catching a wrong rule, parameter or state. float64
# backends replay the reference's own arithmetic up to summation order.
DECISION_MARGIN = {"float64": 1e-9, "other": 2e-3}


@dataclass(frozen=True)
class Backend:
    """A backend under test: its name, where its arrays live and how exact its arithmetic is.

    ``approximate``: the kernel rounds P to the input's 16-bit type before P.V and uses
    approximate exp2/log2 (the GPU's tensor-core path), so outputs are held to the relative L2
    bound of their dtype and LSE to the approximate tolerance.
    """

    name: str
    gpu: bool
    dtypes: tuple
    approximate: bool

    @property
    def module(self):
        from pysparse_attn import backends

        return backends.load(self.name)

    def unavailable_reason(self) -> Optional[str]:
        try:
            from pysparse_attn import backends

            module = backends.load(self.name)
        except Exception as error:  # not built, no CuPy, no device
            return f"{self.name} backend not available: {error}"
        reason = getattr(module, "unavailable_reason", lambda: None)()
        return None if reason is None else f"{self.name} backend not available: {reason}"

    def device(self, x, dtype):
        """Host float64 ``x`` as a ``dtype`` array of this backend (rounded once)."""
        if not self.gpu:
            return x.astype(DTYPES[dtype])
        import cupy

        # Through float32 on the device: CuPy's own bfloat16 conversion, whatever its support
        # for ml_dtypes host arrays. The oracle reads the rounded values back (``exact``).
        return cupy.asarray(x.astype(np.float32)).astype(DTYPES[dtype])

    def host(self, x):
        return x.get() if hasattr(x, "get") else np.asarray(x)


BACKENDS = {
    "reference": Backend("reference", False, ("float64", "float32", "float16", "bfloat16"),
                         False),
    "cpu": Backend("cpu", False, ("float64", "float32", "float16", "bfloat16"), False),
    "cupy": Backend("cupy", True, ("float16", "bfloat16"), True),
}


def backend_params(names=("reference", "cpu", "cupy")):
    """``pytest.param`` per backend: GPU ones marked ``gpu``; unavailable ones skip, saying why."""
    params = []
    for name in names:
        backend = BACKENDS[name]
        reason = backend.unavailable_reason()
        marks = [pytest.mark.gpu] if backend.gpu else []
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(backend, id=name, marks=marks))
    return params


def exact(x):
    """float64 host copy of the values a backend actually reads (after rounding to its dtype)."""
    if hasattr(x, "get"):  # CuPy: widen 16-bit types on the device, then copy
        x = (x.astype(np.float32) if x.dtype.itemsize == 2 else x).get()
    x = np.asarray(x)
    return np.asarray(x.astype(np.float32) if x.dtype.itemsize == 2 else x, dtype=np.float64)


def laid_out(x, dtype, layout, backend):
    """``x`` (float64, canonical) rounded to ``dtype`` on the backend, seen through ``layout``.

    ``bnhd`` is the flash-attn layout seen as a transposed view; ``strided`` (host only) has a
    negative stride along N and a stride of 2 along D, so no kernel may assume contiguous rows.
    """
    x = np.asarray(x, dtype=np.float64)
    if layout == "bhnd":
        return backend.device(np.ascontiguousarray(x), dtype)
    if layout == "bnhd":
        return backend.device(np.ascontiguousarray(x.transpose(0, 2, 1, 3)),
                              dtype).transpose(0, 2, 1, 3)
    assert not backend.gpu, "strided views are a host layout"
    x = x.astype(DTYPES[dtype])
    buffer = np.zeros(x.shape[:3] + (2 * x.shape[3],), dtype=x.dtype)
    buffer[..., ::2] = x[:, :, ::-1]
    view = buffer[:, :, ::-1, ::2]
    assert view.strides[2] < 0 and not view.flags.c_contiguous
    return view


def logit_error(q, k, scale, dtype):
    """Absolute error float32 logits can carry: a few ulps of the largest ``scale |q|.|k|``.

    Sharp problems reach |s| ~ 100s; the LSE moves by as much and O by that times max|v|.
    Zero for float64, which accumulates in float64.
    """
    if dtype == "float64":
        return 0.0
    group = q.shape[1] // k.shape[1]
    k_abs = np.repeat(np.abs(k), group, axis=1)
    return 8 * 2.0 ** -24 * (abs(scale) * np.abs(q) @ np.swapaxes(k_abs, -1, -2)).max()


def listed_tiles(plan):
    """The ``(B, H, nq, nk)`` tiles a host plan's rows name, and each non-empty row's first."""
    offsets, indices = np.asarray(plan.row_offsets), np.asarray(plan.row_indices)
    B, H = offsets.shape[:2]
    listed = np.zeros((B, H, plan.nq, plan.nk), dtype=bool)
    first = np.zeros_like(listed)
    for b, h, i in np.ndindex(B, H, plan.nq):
        entries = indices[b, h, offsets[b, h, i]:offsets[b, h, i + 1]]
        assert len(set(entries.tolist())) == entries.size, "a tile is listed twice in a row"
        listed[b, h, i, entries] = True
        if entries.size:
            first[b, h, i, entries[0]] = True
    return listed, first


def _poison_gpu_pool(shape):
    """Leave NaN (0xFFFF in float16 and bfloat16) in the pool block the output will reuse."""
    import cupy

    poison = cupy.full(shape, 0xFFFF, dtype=cupy.uint16)
    del poison


def _rel_l2(a, b):
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def check_forward(backend, q, k, v, *, dtype, block, rule=None, select=None, order="natural",
                  peak=2, scale=None, layout="bhnd", options=None):
    """Run ``backend``'s forward on ``q, k, v`` (float64, canonical) and check the contract.

    Returns a dict with the host ``kept``, ``visited``, ``bound``, the exact inputs and the
    host plan, and ``skipped`` (tiles skipped in the loop).
    """
    arrays = [laid_out(x, dtype, layout, backend) for x in (q, k, v)]
    before = [x.copy() for x in arrays]
    q64, k64, v64 = (exact(x) for x in arrays)
    B, H, Nq, D = q64.shape
    scale = D ** -0.5 if scale is None else scale
    plan = psa.plan(arrays[0], arrays[1], select=select, order=order, peak=peak, block=block,
                    scale=scale)
    if backend.gpu:
        _poison_gpu_pool((B, H, Nq, D))
    out, lse, kept, visited, bound = backend.module.forward(*arrays, plan, rule, scale, True,
                                                            **(options or {}))
    if backend.gpu:
        import cupy

        cupy.cuda.runtime.deviceSynchronize()
    for x, y in zip(arrays, before):
        assert bool((x == y).all()), "an input was written"
    assert out.dtype == arrays[0].dtype and out.shape == (B, H, Nq, D)
    accumulates_in = np.float64 if dtype == "float64" or backend.name == "reference" \
        else np.float32
    assert lse.dtype == accumulates_in and bound.dtype == accumulates_in
    out_h = exact(out)
    lse_h, kept, visited, bound = (backend.host(x) for x in (lse, kept, visited, bound))
    host_plan = plan.to("host")

    listed, first = listed_tiles(host_plan)
    nonempty = listed.any(axis=-1)
    assert np.isfinite(out_h).all(), "unwritten (poisoned) or non-finite output"
    assert np.isfinite(bound).all()
    assert np.isfinite(lse_h[np.repeat(nonempty, block[0], axis=2)[:, :, :Nq]]).all()
    np.testing.assert_array_equal(visited, listed, err_msg="visited != the plan's lists")
    assert not (kept & ~visited).any(), "a kept tile was not visited"
    assert kept[first].all(), "the first visited tile of a list was skipped"

    ref_out, ref_lse = _reference.masked_attention(q64, k64, v64, kept, block, scale)
    rows_kept = np.repeat(nonempty, block[0], axis=2)[:, :, :Nq]
    ref_out = np.where(rows_kept[..., None], ref_out, 0.0)  # empty rows: O = 0 by contract
    tolerance = OUTPUT_TOLERANCE[dtype]
    if backend.approximate:
        error = _rel_l2(out_h, ref_out)
        assert error <= tolerance.rel_l2, \
            f"relative L2 error {error:.3g} vs exact attention on the reported kept set"
    else:
        extra = logit_error(q64, k64, scale, dtype) * np.abs(v64).max()
        np.testing.assert_allclose(out_h, ref_out, rtol=tolerance.rtol,
                                   atol=tolerance.atol + extra,
                                   err_msg="output vs exact attention on the reported kept set")
    valid = rows_kept
    if backend.approximate:
        assert np.max(np.abs(lse_h[valid] - ref_lse[valid]), initial=0.0) <= \
            LSE_TOLERANCE["approximate"]
    else:
        rtol, atol = LSE_TOLERANCE["float64" if dtype == "float64" or backend.name ==
                                   "reference" else "accumulated"]
        np.testing.assert_allclose(lse_h[valid], ref_lse[valid], rtol=rtol,
                                   atol=atol + logit_error(q64, k64, scale, dtype))

    slack = _reference.decision_slack(q64, k64, v64, host_plan, kept, rule, scale)
    decided = ~np.isnan(slack)
    margin = DECISION_MARGIN["float64" if dtype == "float64" or backend.name == "reference"
                             else "other"]
    skipped = decided & ~kept
    assert (slack[skipped] >= -margin).all(), "skipped a tile the rule keeps"
    assert (slack[decided & kept] <= margin).all(), "kept a tile the rule skips"
    if rule is None:
        np.testing.assert_array_equal(kept, visited)
        np.testing.assert_array_equal(bound, 1.0)
    return dict(kept=kept, visited=visited, bound=bound, q64=q64, k64=k64, v64=v64,
                plan=host_plan, skipped=int(skipped.sum()), out=out_h)


def csr_plan(rows, block):
    """A plan-like object (what a backend reads) from nested per-(b, h) lists of key tiles.

    ``rows[b][h]`` is the list of query tile rows, each a list of key tiles in visit order.
    """
    B, H, nq = len(rows), len(rows[0]), len(rows[0][0])
    capacity = max(1, max(sum(len(r) for r in rows[b][h]) for b in range(B) for h in range(H)))
    offsets = np.zeros((B, H, nq + 1), np.int32)
    indices = np.full((B, H, capacity), -1, np.int32)
    for b in range(B):
        for h in range(H):
            flat = [tile for row in rows[b][h] for tile in row]
            offsets[b, h, 1:] = np.cumsum([len(row) for row in rows[b][h]])
            indices[b, h, :len(flat)] = flat
    return SimpleNamespace(row_offsets=offsets, row_indices=indices, block=tuple(block))
