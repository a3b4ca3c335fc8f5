"""The CUDA backend: fused kernels from ``gpu/*.cu`` compiled by NVRTC through CuPy.

Kernel families, their template instances listed in typed tables and compiled at first use
(CuPy caches the binaries on disk): two forwards with one contract, ``"wgmma"`` (Hopper warpgroup
MMA, ``gpu/attention_forward_sm90.cu``, :data:`FORWARD_SM90_INSTANCES`, compiled for sm_90a and
used by default on compute capability 9.0) and ``"mma_sync"`` (``gpu/attention_forward.cu``,
:data:`FORWARD_INSTANCES`, sm_80 and newer); one NVRTC module per element type, head dim and
query tile, holding the five skip-rule instances. Then the plan stage (:data:`PLAN_INSTANCES`:
tile means and the per-query-tile selector). Sources are
read from the installed ``pysparse_attn/_gpu_kernels/`` first, then from the repository's
``gpu/``, with their local headers inlined.

Precision: bfloat16 and float16 inputs run on tensor cores (``wgmma`` m64nNk16 or ``mma.sync``
m16n8k16) with float32 accumulation. float32 inputs are *converted to bfloat16* for the tensor
cores (accumulation stays float32, the output is float32): expect bfloat16-level error, about
1e-2 relative.

The SLA linear branch (``linear_branch``, ``sla_merge``, ``linear_backward``) runs on the GPU:
the feature maps and the merge of ``gpu/linear_branch.cu`` (:data:`LINEAR_INSTANCES`) around
cuBLAS GEMMs. The sparse backward (``attention_backward``) has no GPU kernel yet: it runs the
float64 reference on the host and returns CuPy arrays.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from .._plan import Plan, tile_count
from .._plan import build_plan as _generic_build_plan
from .._rules import BLASST, CEF, NO_SKIP, RECALL, RECALL_EXACT
from .._select import SlaSplit, TopK, TopP

__all__ = [
    "available",
    "unavailable_reason",
    "supported_blocks",
    "supported_head_dims",
    "forward",
    "linear_branch",
    "sla_merge",
    "build_plan",
    "attention_backward",
    "linear_backward",
    "fused_block_scores",
    "FORWARD_INSTANCES",
    "FORWARD_SM90_INSTANCES",
    "KERNELS",
    "default_kernel",
    "kernel_unavailable_reason",
    "PLAN_INSTANCES",
    "LINEAR_INSTANCES",
    "LINEAR_OPERAND",
    "kernel_source",
]

LOG2E = 1.4426950408889634
_BLOCKS = ((64, 64), (128, 64))
_HEAD_DIMS = (64, 128)
# dtype name of the inputs -> C++ element type of the tensor-core path.
_ELEMENTS = {"bfloat16": "psa::Bf16", "float16": "psa::Fp16"}
# Rule code of the backend contract -> skip functor of gpu/skip_rules.cuh.
_RULES = {NO_SKIP: "psa::NoSkip", BLASST: "psa::BlasstRule", CEF: "psa::CefRule",
          RECALL: "psa::RecallRule", RECALL_EXACT: "psa::RecallExactRule"}


#: Warps per CTA for each (head dim, Bq). Four everywhere: 16 rows a warp for 64-row tiles,
#: 32 for 128-row tiles, which beat 8 warps x 16 rows by 5% at D = 128 and 15% at D = 64
#: (bench/results/gpu.md) although the D = 128 instance spills a little.
WARPS = {(64, 64): 4, (64, 128): 4, (128, 64): 4, (128, 128): 4}


def _forward_name(element: str, head_dim: int, block_q: int, warps: int, rule: str) -> str:
    return f"psa::attention_forward<{element}, {head_dim}, {block_q}, {warps}, {rule}>"


#: Every instance of the forward family, keyed by (dtype name, head dim, Bq, Bk, rule code).
FORWARD_INSTANCES = {
    (dtype, d, bq, bk, code): _forward_name(element, d, bq, WARPS[(d, bq)], rule)
    for dtype, element in _ELEMENTS.items()
    for d in _HEAD_DIMS
    for bq, bk in _BLOCKS
    for code, rule in _RULES.items()
}


def _forward_sm90_name(element: str, head_dim: int, block_q: int, rule: str) -> str:
    return f"psa::attention_forward_sm90<{element}, {head_dim}, {block_q}, {rule}>"


#: The wgmma forward's instances, same keys as :data:`FORWARD_INSTANCES`.
FORWARD_SM90_INSTANCES = {
    (dtype, d, bq, bk, code): _forward_sm90_name(element, d, bq, rule)
    for dtype, element in _ELEMENTS.items()
    for d in _HEAD_DIMS
    for bq, bk in _BLOCKS
    for code, rule in _RULES.items()
}

#: Forward kernels by name, with the compute capabilities (major, minor) each runs on.
KERNELS = {"wgmma": ((9, 0),), "mma_sync": None}  # None: any capability >= 8.0

#: Plan-stage instances: tile means per (dtype name, head dim), and the tile selector.
_MEAN_ROW_GROUPS = {64: 16, 128: 8}  # (D / 8) * groups = 128 threads
PLAN_INSTANCES = {
    **{("tile_means", dtype, d): f"psa::tile_means<{element}, {d}, {_MEAN_ROW_GROUPS[d]}>"
       for dtype, element in _ELEMENTS.items() for d in _HEAD_DIMS},
    **{("block_scores", d): f"psa::block_scores<{d}>" for d in _HEAD_DIMS},
    ("select_tiles",): "psa::select_tiles",
}
_SELECT_THREADS = 256
_MAX_SORTED_TILES = 4096  # shared memory of the in-CTA sort: 8 bytes a tile
_ORDER_CODES = {"natural": 0, "score": 1, "peak": 2}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def _source_dirs():
    package = Path(__file__).resolve().parent.parent
    return [package / "_gpu_kernels", package.parent / "gpu"]


def _read_source(name: str) -> str:
    for folder in _source_dirs():
        path = folder / name
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"CUDA source {name!r} not found in "
                            f"{[str(d) for d in _source_dirs()]}")


@functools.lru_cache(maxsize=None)
def kernel_source(name: str) -> str:
    """The source of ``name`` with its local ``#include "..."`` inlined (each header once).

    Inlining makes the headers part of the text CuPy hashes for its kernel cache, so an edited
    header can never be served a stale binary.
    """
    seen = set()

    def expand(file_name):
        if file_name in seen:
            return ""
        seen.add(file_name)
        text = _read_source(file_name)
        return _INCLUDE.sub(lambda match: expand(match.group(1)), text)

    return expand(name)


def unavailable_reason():
    """Why this backend cannot run here, or ``None``."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not importable ({type(error).__name__}: {error})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
        major = int(cupy.cuda.Device().compute_capability[:-1])
    except Exception as error:
        return f"no usable CUDA device ({type(error).__name__}: {error})"
    if major < 8:
        return "the kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async)"
    return None


def available() -> bool:
    """Whether CuPy and a CUDA device of compute capability >= 8.0 are present."""
    return unavailable_reason() is None


def supported_blocks():
    """Tile sizes ``(Bq, Bk)`` the kernels are instantiated for."""
    return [tuple(b) for b in _BLOCKS]


def supported_head_dims():
    """Head dimensions the kernels are instantiated for."""
    return list(_HEAD_DIMS)


@functools.lru_cache(maxsize=None)
def _raw_module(source: str, names: tuple, arch: str = None):
    """The NVRTC module of ``source`` holding the template instances ``names``, compiled for
    ``arch`` (default: the current device's ``sm_XY``)."""
    import cupy

    arch = arch or f"sm_{cupy.cuda.Device().compute_capability}"
    return cupy.RawModule(code=kernel_source(source), options=("--std=c++17", f"-arch={arch}"),
                          name_expressions=list(names))


def _forward_module(dtype_name: str, head_dim: int, block_q: int, warps: int):
    """The module of one (element type, head dim, query tile, warps): five rule instances."""
    names = tuple(_forward_name(_ELEMENTS[dtype_name], head_dim, block_q, warps, rule)
                  for rule in _RULES.values())
    return _raw_module("attention_forward.cu", names)


def _forward_sm90_module(dtype_name: str, head_dim: int, block_q: int):
    """The sm_90a module of one (element type, head dim, query tile): five rule instances."""
    names = tuple(_forward_sm90_name(_ELEMENTS[dtype_name], head_dim, block_q, rule)
                  for rule in _RULES.values())
    return _raw_module("attention_forward_sm90.cu", names, "sm_90a")


def kernel_unavailable_reason(kernel: str):
    """Why forward family ``kernel`` cannot run on the current device, or ``None``."""
    import cupy

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    capability = tuple(int(c) for c in divmod(int(cupy.cuda.Device().compute_capability), 10))
    runs_on = KERNELS[kernel]
    if runs_on is not None and capability not in runs_on:
        return (f"kernel {kernel!r} needs compute capability {runs_on}; this device has "
                f"{capability}")
    return None


def default_kernel() -> str:
    """``"wgmma"`` where :data:`KERNELS` says it runs (compute capability 9.0), else
    ``"mma_sync"``."""
    return "wgmma" if kernel_unavailable_reason("wgmma") is None else "mma_sync"


def _forward_kernel(dtype_name, head_dim, block_q, code, warps=None, kernel=None):
    """The compiled instance, its shared-memory size and thread count.

    ``kernel`` picks the family (:func:`default_kernel` when None); ``warps`` overrides
    :data:`WARPS` for the mma.sync family (benchmarks compare both layouts).
    """
    kernel = kernel or default_kernel()
    reason = kernel_unavailable_reason(kernel)
    if reason is not None:
        raise ValueError(reason)
    if kernel == "wgmma":
        name = _forward_sm90_name(_ELEMENTS[dtype_name], head_dim, block_q, _RULES[code])
        function = _forward_sm90_module(dtype_name, head_dim, block_q).get_function(name)
        shared, threads = _shared_bytes_sm90(head_dim, block_q), 2 * block_q
    else:
        warps = warps or WARPS[(head_dim, block_q)]
        name = _forward_name(_ELEMENTS[dtype_name], head_dim, block_q, warps, _RULES[code])
        function = _forward_module(dtype_name, head_dim, block_q, warps).get_function(name)
        shared, threads = _shared_bytes(head_dim, block_q), warps * 32
    if shared > 48 * 1024 and function.max_dynamic_shared_size_bytes < shared:
        function.max_dynamic_shared_size_bytes = shared
    return function, shared, threads


def _shared_bytes(head_dim, block_q, block_k=64):
    """Shared memory of one mma.sync CTA: Q plus double-buffered K and V (gpu/tile_traits.cuh)."""
    return 2 * (block_q * head_dim + 4 * block_k * head_dim)


def _shared_bytes_sm90(head_dim, block_q, block_k=64):
    """Shared memory of one wgmma CTA (gpu/tile_traits_sm90.cuh): Q, a ring of K and V tiles,
    and 1024 bytes to align the swizzle atoms."""
    stages = 4 if block_q == 128 else 3
    return 2 * (block_q * head_dim + 2 * stages * block_k * head_dim) + 1024


def _dtype_name(x) -> str:
    return getattr(x.dtype, "name", str(x.dtype))


def _kernel_ready(cupy, x):
    """``x`` itself when the kernel can read it by strides, else a contiguous copy.

    The kernel needs a unit stride along D and 16-byte aligned rows (cp.async copies 16 bytes).
    """
    item = x.itemsize
    strides = x.strides
    aligned = (strides[-1] == item and all(s % 16 == 0 for s in strides[:-1])
               and x.data.ptr % 16 == 0)
    return x if aligned else cupy.ascontiguousarray(x)


def _element_strides(x):
    return [np.int64(s // x.itemsize) for s in x.strides[:3]]


def forward(q, k, v, plan, rule_code, rule_param, scale, want_stats=True, warps=None,
            kernel=None):
    """Fused forward of the backend contract (``docs/internals.rst``).

    Parameters
    ----------
    q : cupy.ndarray ``(B, Hq, Nq, D)``
        bfloat16, float16 or float32 (see the module docstring); any strides.
    k, v : cupy.ndarray ``(B, Hkv, Nk, D)``
        Same dtype as ``q``; ``Hq % Hkv == 0``.
    plan : pysparse_attn._plan.Plan
        Visit lists (CuPy or NumPy arrays); ``plan.block`` must be a supported tile size.
    rule_code : int
        0 none, 1 Blasst, 2 Cef, 3 Recall, 4 Recall exact.
    rule_param : float
        The rule's parameter as in the contract (natural-log units for codes 1 and 2).
    scale : float
        Logit scale (> 0).
    want_stats : bool
        Also return the kept/visited bitmaps and the recall bound.
    warps : int, optional
        Warps per CTA of the mma.sync kernel, overriding :data:`WARPS` (for benchmarks; 4 or
        ``Bq / 16``).
    kernel : {"wgmma", "mma_sync"}, optional
        Forward family (:data:`KERNELS`); :func:`default_kernel` when None.

    Returns
    -------
    out, lse, kept, visited, recall_bound
        ``out`` in the input dtype, ``lse`` and ``recall_bound`` float32, bitmaps bool
        ``(B, Hq, nq, nk)``; the last three are None when ``want_stats`` is false.
    """
    import cupy

    dtype_name = _dtype_name(q)
    for name, x in (("k", k), ("v", v)):
        if _dtype_name(x) != dtype_name:
            raise TypeError(f"{name} has dtype {_dtype_name(x)} but q has {dtype_name}")
    if dtype_name not in (*_ELEMENTS, "float32"):
        raise TypeError(f"q must be bfloat16, float16 or float32 on the cupy backend, got "
                        f"{dtype_name}")
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if D not in _HEAD_DIMS:
        raise ValueError(f"q has head dim {D}; the cupy backend supports {list(_HEAD_DIMS)}")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k's {Hkv}")
    block = tuple(int(b) for b in plan.block)
    if block not in _BLOCKS:
        raise ValueError(f"block {block} is not supported by the cupy backend; supported: "
                         f"{list(_BLOCKS)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if rule_code not in _RULES:
        raise ValueError(f"rule_code must be one of {sorted(_RULES)}, got {rule_code}")

    out_dtype = q.dtype
    if dtype_name == "float32":
        import ml_dtypes

        q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
        dtype_name = "bfloat16"
    q, k, v = (_kernel_ready(cupy, x) for x in (q, k, v))
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    if (plan.nq, plan.nk) != (nq, nk):
        raise ValueError(f"plan has {plan.nq}x{plan.nk} tiles but the inputs need {nq}x{nk}")

    out = cupy.empty((B, Hq, Nq, D), dtype=q.dtype)
    lse = cupy.empty((B, Hq, Nq), dtype=cupy.float32)
    if want_stats:
        kept = cupy.zeros((B, Hq, nq, nk), dtype=cupy.bool_)
        visited = cupy.zeros((B, Hq, nq, nk), dtype=cupy.bool_)
        bound = cupy.empty((B, Hq, Nq), dtype=cupy.float32)
    else:  # the kernel never touches these when want_stats is 0
        kept = visited = cupy.zeros((1,), dtype=cupy.bool_)
        bound = cupy.zeros((1,), dtype=cupy.float32)
    visit = cupy.ascontiguousarray(cupy.asarray(plan.visit), dtype=cupy.int32)
    count = cupy.ascontiguousarray(cupy.asarray(plan.count), dtype=cupy.int32)
    if tuple(visit.shape[:3]) != (B, Hq, nq) or tuple(count.shape) != (B, Hq, nq):
        raise ValueError(f"plan arrays have shapes {visit.shape}, {count.shape}; expected "
                         f"(B, H, nq, L) and (B, H, nq) = {(B, Hq, nq)}")

    param = float(rule_param) * LOG2E if rule_code in (BLASST, CEF) else float(rule_param)
    function, shared, threads = _forward_kernel(dtype_name, D, block[0], rule_code, warps, kernel)
    args = (q, k, v, out, *_element_strides(q), *_element_strides(k), *_element_strides(v),
            *_element_strides(out), np.int32(Nq), np.int32(Nk), np.int32(Hq // Hkv),
            visit, count, np.int32(visit.shape[-1]), np.float32(scale * LOG2E),
            np.float32(param), lse, bound, kept, visited, np.int32(bool(want_stats)))
    function((nq, Hq, B), (threads,), args, shared_mem=shared)
    if out.dtype != out_dtype:
        out = out.astype(out_dtype)
    if not want_stats:
        return out, lse, None, None, None
    return out, lse, kept, visited, bound


def _plan_module():
    return _raw_module("plan_select.cu", tuple(PLAN_INSTANCES.values()))


def _tile_means(cupy, x, tile, factor):
    """float32 ``(B, H, n_tiles, D)`` means of each tile's valid rows, times ``factor``."""
    B, H, N, D = x.shape
    x = _kernel_ready(cupy, x)
    n_tiles = tile_count(N, tile)
    means = cupy.empty((B, H, n_tiles, D), dtype=cupy.float32)
    kernel = _plan_module().get_function(PLAN_INSTANCES[("tile_means", _dtype_name(x), D)])
    kernel((n_tiles, H, B), ((D // 8) * _MEAN_ROW_GROUPS[D],),
           (x, *_element_strides(x), np.int32(N), np.int32(tile), np.float32(factor), means))
    return means


def fused_block_scores(q, k, block, scale):
    """Block scores of DESIGN.md section 3 for 16-bit CuPy inputs: float32 ``(B, Hq, nq, nk)``.

    Two kernels: the tile means of q and of k (one pass over each), then the centred products
    (``block_scores`` in ``gpu/plan_select.cu``).
    """
    import cupy

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    q_means = _tile_means(cupy, q, block[0], scale)
    k_means = _tile_means(cupy, k, block[1], 1.0)
    nq, nk = q_means.shape[2], k_means.shape[2]
    group = Hq // Hkv
    scores = cupy.empty((B, Hq, nq, nk), dtype=cupy.float32)
    kernel = _plan_module().get_function(PLAN_INSTANCES[("block_scores", D)])
    kernel(((group * nq + 15) // 16, Hkv, B), (256,),
           (q_means, k_means, np.int32(nq), np.int32(nk), np.int32(group), scores))
    return scores


def build_plan(xp, q, k, selector, order, peak, block, scale, linear="marginal"):
    """The plan of ``selector`` on the GPU, with no host round trip for TopK, TopP and dense.

    16-bit inputs with ``select`` None, :class:`TopK` or :class:`TopP` take the fused path:
    block scores from :func:`fused_block_scores`, then one kernel that sorts each query tile's
    scores in shared memory and writes its visit list. TopP lists are padded with -1 to ``nk``
    (their longest length is not known without a device-to-host copy). Other selectors
    (BlockMask, the SLA split) and float32 inputs use the generic builder of ``_plan.py``,
    with scores in float32.
    """
    import cupy

    B, Hq, Nq, D = q.shape
    nq, nk = tile_count(Nq, block[0]), tile_count(k.shape[2], block[1])
    n_pow2 = 1 << max(0, (nk - 1).bit_length())
    fused = (xp is cupy and _dtype_name(q) in _ELEMENTS and D in _HEAD_DIMS
             and (selector is None or isinstance(selector, (TopK, TopP)))
             and n_pow2 <= _MAX_SORTED_TILES)
    if fused and selector is None and order == "natural":
        visit = cupy.broadcast_to(cupy.arange(nk, dtype=cupy.int32), (B, Hq, nq, nk))
        return Plan(visit=cupy.ascontiguousarray(visit),
                    count=cupy.full((B, Hq, nq), nk, dtype=cupy.int32), marginal=None,
                    block=tuple(block), nq=nq, nk=nk)
    if fused:
        if isinstance(selector, TopK):
            keep, top_p, width = selector.count(nk), 0.0, min(selector.count(nk), nk)
        elif isinstance(selector, TopP):
            keep, top_p, width = 0, float(selector.p), nk
        else:
            keep, top_p, width = nk, 0.0, nk
        scores = fused_block_scores(q, k, block, scale)
        visit = cupy.empty((B, Hq, nq, width), dtype=cupy.int32)
        count = cupy.empty((B, Hq, nq), dtype=cupy.int32)
        kernel = _plan_module().get_function(PLAN_INSTANCES[("select_tiles",)])
        shared = 8 * n_pow2 + 4 * _SELECT_THREADS
        if shared > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared
        kernel((nq, Hq, B), (_SELECT_THREADS,),
               (scores, np.int32(nk), np.int32(n_pow2), np.int32(keep), np.float32(top_p),
                np.int32(_ORDER_CODES[order]), np.int32(peak), visit, np.int32(width), count),
               shared_mem=shared)
        return Plan(visit=visit, count=count, marginal=None, block=tuple(block), nq=nq, nk=nk)
    needs_scores = order != "natural" or isinstance(selector, (TopK, TopP, SlaSplit))
    if needs_scores and _dtype_name(q) != "float32":
        q = q.astype(xp.float32)
        k = k.astype(xp.float32)
    return _generic_build_plan(xp, q, k, selector, order, peak, block, scale, linear)


# ---------------------------------------------------------------------------------------------
# SLA linear branch on the GPU: the elementwise stages of gpu/linear_branch.cu around cuBLAS
# GEMMs with float32 accumulation, all queued on the current stream with no host read.
# pysparse_attn/branches/linear.py states the math and the cost of each stage.

_FEATURE_CODES = {"softmax": 0, "elu1": 1, "relu": 2}
_WORDS = {"bfloat16": "psa::Bf16", "float16": "psa::Fp16", "float32": "psa::F32"}
#: GEMM operand type of the linear branch per input dtype: bfloat16 for both 16-bit inputs
#: (a float16 state summing thousands of keys can overflow float16's range), float32 for
#: float32 inputs (float32-class accuracy, no TF32).
LINEAR_OPERAND = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}
_CUDA_DATA_TYPES = {"bfloat16": 14, "float16": 2, "float32": 0}  # CUDA_R_16BF, _16F, _32F
_COMPUTE_32F = 68            # CUBLAS_COMPUTE_32F
_COMPUTE_32F_FAST_TF32 = 77  # CUBLAS_COMPUTE_32F_FAST_TF32
_GEMM_DEFAULT = -1           # CUBLAS_GEMM_DEFAULT
_LINEAR_THREADS = 256        # kLinearWarps * 32 in gpu/linear_branch.cu
_MAX_LINEAR_HEAD_DIM = 256   # kMaxChunks * 32
_ALPHA = np.ones(1, dtype=np.float32)
_BETA = np.zeros(1, dtype=np.float32)


def _features_name(dtype_name: str, feature_map: str, query: bool) -> str:
    return (f"psa::linear_features<{_WORDS[dtype_name]}, "
            f"{_WORDS[LINEAR_OPERAND[dtype_name]]}, {_FEATURE_CODES[feature_map]}, "
            f"{'true' if query else 'false'}>")


def _merge_name(sparse_dtype: str, out_dtype: str) -> str:
    return f"psa::linear_merge<{_WORDS[sparse_dtype]}, {_WORDS[out_dtype]}>"


#: Instances of gpu/linear_branch.cu: feature maps per (input dtype, map, query side) and the
#: merge per (sparse output dtype, output dtype).
LINEAR_INSTANCES = {
    **{("features", dtype, name, query): _features_name(dtype, name, query)
       for dtype in _WORDS for name in _FEATURE_CODES for query in (False, True)},
    **{("merge", sparse, out): _merge_name(sparse, out) for sparse in _WORDS for out in _WORDS},
}


def _linear_function(key):
    return _raw_module("linear_branch.cu", tuple(LINEAR_INSTANCES.values())).get_function(
        LINEAR_INSTANCES[key])


def _unit_stride(cupy, x):
    """``x`` when its last axis is contiguous (what the kernels and cuBLAS need), else a copy."""
    return x if x.strides[-1] == x.itemsize else cupy.ascontiguousarray(x)


def _operand_dtype(dtype_name):
    if LINEAR_OPERAND[dtype_name] == "float32":
        return np.dtype(np.float32)
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


@functools.lru_cache(maxsize=None)
def _pointer_kernel():
    import cupy

    return cupy.ElementwiseKernel(
        "uint64 base, int64 outer_stride, int64 inner_stride, int64 tile_stride, int64 inner, "
        "int64 tiles, int64 item",
        "uint64 pointer",
        "const long long t = i % tiles, o = i / tiles;"
        "pointer = base + (unsigned long long)(((o / inner) * outer_stride"
        " + (o % inner) * inner_stride + t * tile_stride) * item);",
        "psa_linear_tile_pointers")


def _tile_pointers(x, tiles, tile_rows, first_tile=0):
    """Device array of the addresses of row tiles ``first_tile + t`` of every (batch, head)."""
    B, H = x.shape[:2]
    sb, sh, sn = (int(s) // x.itemsize for s in x.strides[:3])
    base = x.data.ptr + first_tile * tile_rows * sn * x.itemsize
    return _pointer_kernel()(np.uint64(base), np.int64(sb), np.int64(sh),
                             np.int64(tile_rows * sn), np.int64(H), np.int64(tiles),
                             np.int64(x.itemsize), size=B * H * tiles)


def _gemm(m, n, k, a, lda, b, ldb, c, ldc, *, types, a_t=False, b_t=False, batch=1,
          strides=(0, 0, 0), pointers=False, compute=_COMPUTE_32F):
    """Row-major ``C (m x n) = op(A) op(B)`` by cuBLAS on the current stream.

    ``op(A)`` is ``m x k`` (``A`` stored ``k x m`` when ``a_t``), ``op(B)`` is ``k x n``; the
    leading dimensions are row strides in elements. ``a``, ``b``, ``c`` are the CuPy arrays
    whose memory the operands start at (strides between batch items in elements), or with
    ``pointers`` uint64 device arrays of one address per batch item. ``types`` is the pair
    (operand type name, output type name). cuBLAS is column-major: it computes ``C^T``.
    """
    from cupy.cuda import cublas, device

    handle = device.get_cublas_handle()
    operand, output = (_CUDA_DATA_TYPES[t] for t in types)
    trans_first = cublas.CUBLAS_OP_T if b_t else cublas.CUBLAS_OP_N
    trans_second = cublas.CUBLAS_OP_T if a_t else cublas.CUBLAS_OP_N
    alpha, beta = _ALPHA.ctypes.data, _BETA.ctypes.data
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        if pointers:
            cublas.gemmBatchedEx(handle, trans_first, trans_second, n, m, k, alpha, b.data.ptr,
                                 operand, ldb, a.data.ptr, operand, lda, beta, c.data.ptr,
                                 output, ldc, batch, compute, _GEMM_DEFAULT)
        else:
            sa, sb, sc = strides
            cublas.gemmStridedBatchedEx(handle, trans_first, trans_second, n, m, k, alpha,
                                        b.data.ptr, operand, ldb, sb, a.data.ptr, operand, lda,
                                        sa, beta, c.data.ptr, output, ldc, sc, batch, compute,
                                        _GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)


def _features(cupy, x, tile, feature_map, query, z=None, z_layout=(1, 1, 1), eps=0.0):
    """phi of ``x`` as GEMM operands, zero-padded to whole tiles; key side also returns Z_J."""
    B, H, N, D = x.shape
    n_tiles = tile_count(N, tile)
    dtype_name = _dtype_name(x)
    phi = cupy.empty((B, H, n_tiles * tile, D), dtype=_operand_dtype(dtype_name))
    sums = None if query else cupy.empty((B, H, n_tiles, D), dtype=cupy.float32)
    function = _linear_function(("features", dtype_name, feature_map, query))
    z_heads, z_group, z_per_tile = z_layout
    function((n_tiles, H, B), (_LINEAR_THREADS,),
             (x, *_element_strides(x), np.int32(H), np.int32(N), np.int32(tile), np.int32(D),
              phi, np.uint64(0) if sums is None else sums, np.uint64(0) if z is None else z,
              np.int32(z_heads), np.int32(z_group), np.int32(z_per_tile), np.float32(eps)))
    return phi, sums


def _linear_output(q, k, v, marginal, block, feature_map, eps, weight=None, mode=None):
    """float32 ``(B, Hq, nq * Bq, D)``: ``O_l`` (rows padded to whole query tiles), or, for
    ``mode="global"`` with ``weight``, ``O_l W^T`` (W folded into the one state per head)."""
    import cupy

    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_q, block_k = (int(b) for b in block)
    nq, nk = tile_count(Nq, block_q), tile_count(Nk, block_k)
    dtype_name = _dtype_name(q)
    if dtype_name not in _WORDS:
        raise TypeError(f"q must be bfloat16, float16 or float32 on the cupy backend, got "
                        f"{dtype_name}")
    if D > _MAX_LINEAR_HEAD_DIM:
        raise ValueError(f"the linear branch supports head dims up to {_MAX_LINEAR_HEAD_DIM}")
    operand = LINEAR_OPERAND[dtype_name]
    types = (operand, operand)
    q, k, v = (_unit_stride(cupy, x) for x in (q, k, v))
    if _dtype_name(v) != operand:
        v = v.astype(_operand_dtype(dtype_name))
    phi_k, tile_z = _features(cupy, k, block_k, feature_map, query=False)
    v_row = int(v.strides[2]) // v.itemsize
    if mode == "global":
        # One state per kv head over all keys: no tile states at all.
        state = cupy.empty((B, Hkv, D, D), dtype=cupy.float32)
        _gemm(D, D, Nk, _tile_pointers(phi_k, 1, 0), D, _tile_pointers(v, 1, 0), v_row,
              _tile_pointers(state, 1, 0), D, types=(operand, "float32"), a_t=True,
              batch=B * Hkv, pointers=True)
        z = tile_z.sum(axis=2)                                          # (B, Hkv, D)
        if weight is not None:  # (O_l) W^T = phi(q) (H W^T) / den, W in float32
            state = cupy.matmul(state, weight.T.astype(cupy.float32, copy=False))
        states = cupy.ascontiguousarray(state.astype(_operand_dtype(dtype_name)))
        z_layout = (Hkv, group, 0)
    else:
        tile_h = cupy.empty((B, Hkv, nk, D, D), dtype=_operand_dtype(dtype_name))
        full, rest = Nk // block_k, Nk % block_k
        for first, tiles, keys in ((0, full, block_k), (full, 1 if rest else 0, rest)):
            if tiles == 0:
                continue
            _gemm(D, D, keys, _tile_pointers(phi_k, tiles, block_k, first), D,
                  _tile_pointers(v, tiles, block_k, first), v_row,
                  _tile_pointers(tile_h.reshape(B, Hkv, nk * D, D), tiles, D, first), D,
                  types=types, a_t=True, batch=B * Hkv * tiles, pointers=True)
        flags = cupy.ascontiguousarray(cupy.asarray(marginal).reshape(B, Hkv, group * nq, nk),
                                       dtype=cupy.float32)
        states = cupy.empty((B, Hkv, group * nq, D * D), dtype=_operand_dtype(dtype_name))
        _gemm(group * nq, D * D, nk, flags.astype(states.dtype), nk, tile_h, D * D, states,
              D * D, types=types, batch=B * Hkv,
              strides=(group * nq * nk, nk * D * D, group * nq * D * D))
        z = cupy.matmul(flags, tile_z)                 # (B, Hkv, group * nq, D) = (B, Hq, nq, D)
        z_layout = (Hq, 1, 1)
    phi_q, _ = _features(cupy, q, block_q, feature_map, query=True,
                         z=cupy.ascontiguousarray(z), z_layout=z_layout, eps=eps)
    out = cupy.empty((B, Hq, nq * block_q, D), dtype=cupy.float32)
    if mode == "global":
        rows = group * nq * block_q
        _gemm(rows, D, D, phi_q, D, states, D, out, D, types=(operand, "float32"),
              batch=B * Hkv, strides=(rows * D, D * D, rows * D))
    else:
        _gemm(block_q, D, D, phi_q, D, states, D, out, D, types=(operand, "float32"),
              batch=B * Hq * nq, strides=(block_q * D, D * D, block_q * D))
    return out


def linear_branch(q, k, v, marginal, block, feature_map="softmax", eps=0.0, mode=None):
    """SLA linear branch ``O_l = phi(q) H_I / (phi(q) . Z_I + eps)`` on the GPU, float32.

    Parameters
    ----------
    q : cupy.ndarray ``(B, Hq, Nq, D)``
        bfloat16, float16 or float32, unit stride along D (else copied).
    k, v : cupy.ndarray ``(B, Hkv, Nk, D)``
    marginal : bool cupy.ndarray ``(B, Hq, nq, nk)``
    block : (int, int)
    feature_map : {"softmax", "elu1", "relu"}
    eps : float
    mode : {"marginal", "complement", "global"}, optional
        ``"global"`` (every tile marginal) uses one state per head instead of tile states.

    Returns
    -------
    cupy.ndarray float32 ``(B, Hq, Nq, D)``
        Zero rows where a query tile has no marginal tile or the denominator is exactly zero.

    Notes
    -----
    16-bit inputs run every GEMM on bf16 tensor cores with float32 accumulation (phi, the tile
    states and ``H_I`` are rounded to bf16 once each: about 1e-2 relative error at worst);
    float32 inputs run float32 GEMMs.
    """
    import cupy

    B, Hq, Nq, D = q.shape
    if marginal is None:
        return cupy.zeros((B, Hq, Nq, D), dtype=cupy.float32)
    out = _linear_output(q, k, v, marginal, block, feature_map, eps, mode=mode)
    return cupy.ascontiguousarray(out[:, :, :Nq])


def sla_merge(q, k, v, o_sparse, marginal, block, feature_map, eps, weight, bias, out_dtype,
              mode=None):
    """``O_s + O_l W^T + b`` in ``out_dtype``: one GEMM, then one fused elementwise pass.

    ``Y = O_l W^T`` is a float32 GEMM (TF32 tensor cores for 16-bit inputs: ``W`` is kept in
    float32, never rounded to the input's type; plain float32 for float32 inputs); the merge
    adds ``O_s`` (in whatever dtype the sparse kernel wrote it, float32 when asked) and ``b``
    and rounds once. With ``mode="global"`` ``W`` is folded into the per-head state instead and
    the GEMM is not needed.
    """
    import cupy

    B, Hq, Nq, D = q.shape
    out_name = np.dtype(out_dtype).name
    if weight is None or marginal is None:
        merged = o_sparse.astype(cupy.float32)
        if bias is not None:
            merged = merged + bias.astype(cupy.float32, copy=False)
        return merged.astype(out_dtype)
    weight = cupy.ascontiguousarray(weight.astype(cupy.float32, copy=False))
    if mode == "global":
        y = _linear_output(q, k, v, marginal, block, feature_map, eps, weight=weight,
                           mode=mode)
    else:
        o_linear = _linear_output(q, k, v, marginal, block, feature_map, eps, mode=mode)
        y = cupy.empty_like(o_linear)
        rows = o_linear.shape[0] * o_linear.shape[1] * o_linear.shape[2]
        compute = (_COMPUTE_32F if _dtype_name(q) == "float32" else _COMPUTE_32F_FAST_TF32)
        _gemm(rows, D, D, o_linear, D, weight, D, y, D, types=("float32", "float32"),
              b_t=True, strides=(0, 0, 0), compute=compute)
    sparse = cupy.ascontiguousarray(o_sparse)
    out = cupy.empty((B, Hq, Nq, D), dtype=out_dtype)
    bias_arg = np.uint64(0) if bias is None else cupy.ascontiguousarray(
        bias.astype(cupy.float32, copy=False))
    total = B * Hq * Nq * D
    blocks = max(1, min(-(-total // _LINEAR_THREADS), 1 << 16))
    _linear_function(("merge", _dtype_name(sparse), out_name))(
        (blocks,), (_LINEAR_THREADS,),
        (sparse, y, bias_arg, np.int32(Nq), np.int32(y.shape[2]), np.int32(D), np.int64(total),
         out))
    return out


# ---------------------------------------------------------------------------------------------
# Gradients. The sparse backward has no GPU kernel yet: it runs the float64 reference on the
# host (TODO(lead): the kernels' GPU backward replaces it; the oracle is imported only there).
# The linear backward runs on the GPU (float32 CuPy GEMMs of pysparse_attn.branches.linear).


def _host(x):
    return None if x is None else (x.get() if hasattr(x, "get") else np.asarray(x))


def _host_f64(x):
    """A float64 NumPy copy (bfloat16 goes through float32: NumPy cannot cast it directly)."""
    host = _host(x)
    if getattr(host.dtype, "name", "") == "bfloat16":
        host = host.astype(np.float32)
    return host.astype(np.float64)


def attention_backward(q, k, v, do, kept, block, scale):
    """``(dq, dk, dv)`` in float32 CuPy arrays, computed by the float64 reference on the host."""
    import cupy

    from .. import _reference

    grads = _reference.attention_backward(_host_f64(q), _host_f64(k), _host_f64(v),
                                          _host_f64(do), _host(kept), block, scale)
    return tuple(cupy.asarray(g.astype(np.float32)) for g in grads)


def linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, mode=None):
    """Gradients ``(dq, dk, dv)`` of :func:`linear_branch` on the GPU, float32.

    The array-generic vjp of :mod:`pysparse_attn.branches.linear` on CuPy arrays: float32
    batched GEMMs per tile (tile states, ``dH_I``) and one GEMM of the transposed 0/1 marginal
    matrix; nothing leaves the device.
    """
    import cupy

    from ..branches import linear as _linear

    return _linear.linear_attention_vjp(cupy, q, k, v, cupy.asarray(marginal), block,
                                        feature_map, eps, d_linear, cupy.float32)
