"""The CUDA backend: fused kernels from ``gpu/*.cu`` compiled by NVRTC through CuPy.

Kernel families, their template instances listed in typed tables and compiled at first use
(CuPy caches the binaries on disk): two forwards with one contract, ``"wgmma"`` (Hopper warpgroup
MMA, ``gpu/attention_forward_sm90.cu``, :data:`FORWARD_SM90_INSTANCES`, compiled for sm_90a and
used by default on compute capability 9.0) and ``"mma_sync"`` (``gpu/attention_forward.cu``,
:data:`FORWARD_INSTANCES`, sm_80 and newer); one NVRTC module per element type, head dim and
query tile, holding one instance per skip-rule functor (``_rules.ALL_FUNCTORS``). Then the plan stage (:data:`PLAN_INSTANCES`:
tile means and the per-query-tile selector). Sources are
read from the installed ``pysparse_attn/_gpu_kernels/`` first, then from the repository's
``gpu/``, with their local headers inlined.

Precision: bfloat16 and float16 inputs run on tensor cores (``wgmma`` m64nNk16 or ``mma.sync``
m16n8k16) with float32 accumulation. :func:`forward` takes only bfloat16 and float16: whether
float32 inputs may be computed in bfloat16 is the API's decision (an explicit opt-in), never
this backend's.

The SLA linear branch (``linear_branch``, ``sla_merge``, ``linear_backward``) runs on the GPU:
the feature maps and the merge of ``gpu/linear_branch.cu`` (:data:`LINEAR_INSTANCES`) around
cuBLAS GEMMs.

:func:`forward` never synchronises with the host: it reads no device value, and the compiled
function, its shared-memory size and attributes are cached per instance. Plans are validated
upstream (``pysparse_attn.Plan``), never here.

:func:`attention_backward` runs the backward kernels of ``gpu/attention_backward.cu``
(:data:`BACKWARD_INSTANCES`) with the kept set held fixed, on the device, with no host read; its
dK/dV pass is one of :data:`BACKWARD_KERNELS`: ``"mma_sync"`` (that file; the default below
compute capability 9.0) or ``"sm90"`` / ``"sm90_k64"`` (``gpu/attention_backward_sm90.cu``,
wgmma, sm_90a, 128 or 64 keys a CTA, :data:`BACKWARD_SM90_INSTANCES`), chosen by
:func:`default_backward_kernel`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from .._plan import block_scores as _generic_block_scores
from .._plan import build_plan as _generic_build_plan
from .._plan import max_visits_of, rows_from_padded, tile_count, trusted_plan
from .._rules import ALL_FUNCTORS, NO_SKIP_FUNCTOR, rule_functor
from .._select import BlockMask, SlaSplit, TopK, TopP

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
    "sla_linear_vjp",
    "fused_block_scores",
    "FORWARD_INSTANCES",
    "FORWARD_SM90_INSTANCES",
    "BACKWARD_INSTANCES",
    "BACKWARD_SM90_INSTANCES",
    "BACKWARD_KERNELS",
    "BackwardFamily",
    "backward_instances",
    "BACKWARD_WARPS",
    "backward_kernel_unavailable_reason",
    "FORWARD_SM90_WS_INSTANCES",
    "SM90_WS_CONFIGS",
    "KERNELS",
    "default_kernel",
    "default_backward_kernel",
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


#: Warps per CTA for each (head dim, Bq). Four everywhere: 16 rows a warp for 64-row tiles,
#: 32 for 128-row tiles, which beat 8 warps x 16 rows by 5% at D = 128 and 15% at D = 64
#: (bench/results/gpu.md) although the D = 128 instance spills a little.
WARPS = {(64, 64): 4, (64, 128): 4, (128, 64): 4, (128, 128): 4}


def _forward_name(element: str, head_dim: int, block_q: int, warps: int, rule: str) -> str:
    return f"psa::attention_forward<{element}, {head_dim}, {block_q}, {warps}, {rule}>"


#: Every instance of the forward family, keyed by (dtype name, head dim, Bq, Bk, functor name).
FORWARD_INSTANCES = {
    (dtype, d, bq, bk, functor): _forward_name(element, d, bq, WARPS[(d, bq)], functor)
    for dtype, element in _ELEMENTS.items()
    for d in _HEAD_DIMS
    for bq, bk in _BLOCKS
    for functor in ALL_FUNCTORS
}


def _forward_sm90_name(element: str, head_dim: int, block_q: int, rule: str) -> str:
    return f"psa::attention_forward_sm90<{element}, {head_dim}, {block_q}, {rule}>"


#: The wgmma forward's instances, same keys as :data:`FORWARD_INSTANCES`.
FORWARD_SM90_INSTANCES = {
    (dtype, d, bq, bk, functor): _forward_sm90_name(element, d, bq, functor)
    for dtype, element in _ELEMENTS.items()
    for d in _HEAD_DIMS
    for bq, bk in _BLOCKS
    for functor in ALL_FUNCTORS
}

#: The warp-specialised forward (``gpu/attention_forward_sm90_ws.cu``): (head dim, Bq) ->
#: (K stages, V stages). The one table its instances, launch (threads, shared memory) and
#: compile check derive from; the kernel traps if the shared memory it gets is smaller than its
#: own layout (gpu/tile_traits_sm90.cuh, WarpSpecializedTraits).
SM90_WS_CONFIGS = {(128, 128): (4, 4), (128, 64): (4, 4), (64, 128): (4, 4), (64, 64): (4, 4)}


def _forward_sm90_ws_name(element: str, head_dim: int, block_q: int, rule: str) -> str:
    k_stages, v_stages = SM90_WS_CONFIGS[(head_dim, block_q)]
    return (f"psa::attention_forward_sm90_ws<{element}, {head_dim}, {block_q}, {k_stages}, "
            f"{v_stages}, {rule}>")


#: The warp-specialised forward's instances, same keys as :data:`FORWARD_INSTANCES`.
FORWARD_SM90_WS_INSTANCES = {
    (dtype, d, bq, bk, functor): _forward_sm90_ws_name(element, d, bq, functor)
    for dtype, element in _ELEMENTS.items()
    for d in _HEAD_DIMS
    for bq, bk in _BLOCKS
    for functor in ALL_FUNCTORS
}


def _ws_threads(block_q):
    """One producer warpgroup and one consumer warpgroup per 64 query rows."""
    return 128 * (1 + block_q // 64)


def _shared_bytes_sm90_ws(head_dim, block_q, block_k=64):
    """Shared memory of one warp-specialised CTA, as WarpSpecializedTraits lays it out: Q, the
    K and V rings, the mbarriers (q_full; k_full, k_empty, decided per K stage; v_full,
    v_empty per V stage), the vote slots, and 1024 bytes to align the swizzle atoms."""
    k_stages, v_stages = SM90_WS_CONFIGS[(head_dim, block_q)]
    tiles = 2 * (block_q * head_dim + (k_stages + v_stages) * block_k * head_dim)
    return tiles + 8 * (1 + 3 * k_stages + 2 * v_stages) + 4 * k_stages * (block_q // 64) + 1024


#: Forward kernels by name, with the compute capabilities (major, minor) each runs on.
#: :func:`default_kernel` picks ``sm90_ws`` on Hopper (measured faster than ``wgmma`` on every
#: case of bench/results/forward-v2.md), ``mma_sync`` elsewhere.
KERNELS = {"wgmma": ((9, 0),), "mma_sync": None, "sm90_ws": ((9, 0),)}  # None: any >= 8.0

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
def _raw_module(source: str, names: tuple, arch: str = None, extra_options: tuple = ()):
    """The NVRTC module of ``source`` holding the template instances ``names``, compiled for
    ``arch`` (default: the current device's ``sm_XY``), with ``extra_options`` appended."""
    import cupy

    arch = arch or f"sm_{cupy.cuda.Device().compute_capability}"
    return cupy.RawModule(code=kernel_source(source),
                          options=("--std=c++17", f"-arch={arch}", *extra_options),
                          name_expressions=list(names))


def _forward_module(dtype_name: str, head_dim: int, block_q: int, warps: int):
    """The module of one (element type, head dim, query tile, warps): one instance a functor."""
    names = tuple(_forward_name(_ELEMENTS[dtype_name], head_dim, block_q, warps, functor)
                  for functor in ALL_FUNCTORS)
    return _raw_module("attention_forward.cu", names)


def _sm90a_forward_module(source: str, name_of, dtype_name: str, head_dim: int, block_q: int,
                          macros: tuple = (), functor: str = None):
    """The sm_90a module of one forward family's (element type, head dim, query tile): one
    instance a functor; built with ``macros`` (timing variants), it holds only ``functor`` and
    the no-skip instance."""
    functors = tuple(sorted({functor, NO_SKIP_FUNCTOR})) if macros else ALL_FUNCTORS
    names = tuple(name_of(_ELEMENTS[dtype_name], head_dim, block_q, f) for f in functors)
    return _raw_module(source, names, "sm_90a", tuple(f"-D{macro}" for macro in macros))


def _forward_sm90_module(dtype_name: str, head_dim: int, block_q: int, ablation: tuple = (),
                         functor: str = None):
    """The wgmma forward's module. ``ablation``: timing-only macros of
    ``gpu/attention_forward_sm90.cu`` (``PSA_ABLATE_*``, bench/forward_ablation.py)."""
    return _sm90a_forward_module("attention_forward_sm90.cu", _forward_sm90_name, dtype_name,
                                 head_dim, block_q, ablation, functor)


def _forward_sm90_ws_module(dtype_name: str, head_dim: int, block_q: int, variant: tuple = (),
                            functor: str = None):
    """The warp-specialised forward's module. ``variant``: macros of
    ``gpu/attention_forward_sm90_ws.cu`` that pick a consumer schedule other than the shipped
    one, or a timing-only variant of the rule kernels (the list is in that file's header;
    bench/forward_ablation.py --mode schedule, --mode rule-cost)."""
    return _sm90a_forward_module("attention_forward_sm90_ws.cu", _forward_sm90_ws_name,
                                 dtype_name, head_dim, block_q, variant, functor)


def _device_id() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


@functools.lru_cache(maxsize=None)
def _capability(device: int) -> tuple:
    import cupy

    return tuple(int(c) for c in divmod(int(cupy.cuda.Device(device).compute_capability), 10))


def kernel_unavailable_reason(kernel: str):
    """Why forward family ``kernel`` cannot run on the current device, or ``None``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    return _capability_reason(kernel, KERNELS[kernel])


def _capability_reason(kernel, runs_on):
    capability = _capability(_device_id())
    if runs_on is not None and capability not in runs_on:
        return (f"kernel {kernel!r} needs compute capability {runs_on}; this device has "
                f"{capability}")
    return None


def default_kernel() -> str:
    """``"sm90_ws"`` where :data:`KERNELS` says it runs (compute capability 9.0), else
    ``"mma_sync"``. ``"wgmma"`` (the single-role warpgroup kernel) stays selectable."""
    return "sm90_ws" if kernel_unavailable_reason("sm90_ws") is None else "mma_sync"


@functools.lru_cache(maxsize=None)
def _forward_kernel(device, kernel, dtype_name, head_dim, block_q, functor, warps, ablation=()):
    """The compiled instance on ``device``, its dynamic shared-memory size and thread count.

    Cached per instance: the shared-memory attribute is set once, at first use. ``ablation``
    names timing-only variants of the wgmma kernel (:func:`_forward_sm90_module`) or other
    schedules of the sm90_ws kernel (:func:`_forward_sm90_ws_module`).
    """
    reason = kernel_unavailable_reason(kernel)
    if reason is not None:
        raise ValueError(reason)
    if ablation and kernel not in ("wgmma", "sm90_ws"):
        raise ValueError(f"timing variants exist for the wgmma and sm90_ws kernels only, not "
                         f"{kernel!r}")
    if kernel == "wgmma":
        name = _forward_sm90_name(_ELEMENTS[dtype_name], head_dim, block_q, functor)
        function = _forward_sm90_module(dtype_name, head_dim, block_q, ablation,
                                        functor).get_function(name)
        shared, threads = _shared_bytes_sm90(head_dim, block_q), 2 * block_q
    elif kernel == "sm90_ws":
        name = _forward_sm90_ws_name(_ELEMENTS[dtype_name], head_dim, block_q, functor)
        function = _forward_sm90_ws_module(dtype_name, head_dim, block_q, ablation,
                                           functor).get_function(name)
        shared, threads = _shared_bytes_sm90_ws(head_dim, block_q), _ws_threads(block_q)
    else:
        name = _forward_name(_ELEMENTS[dtype_name], head_dim, block_q, warps, functor)
        function = _forward_module(dtype_name, head_dim, block_q, warps).get_function(name)
        shared, threads = _shared_bytes(head_dim, block_q), warps * 32
    _allow_shared(function, shared)
    return function, shared, threads


def _allow_shared(function, shared):
    """Let ``function`` launch with ``shared`` bytes of dynamic shared memory (past the 48 KB
    default a kernel has to opt in)."""
    if shared > 48 * 1024 and function.max_dynamic_shared_size_bytes < shared:
        function.max_dynamic_shared_size_bytes = shared


def _shared_bytes(head_dim, block_q, block_k=64):
    """Shared memory of one mma.sync CTA: Q plus double-buffered K and V (gpu/tile_traits.cuh)."""
    return 2 * (block_q * head_dim + 4 * block_k * head_dim)


def _shared_bytes_sm90(head_dim, block_q, block_k=64):
    """Shared memory of one wgmma CTA (gpu/tile_traits_sm90.cuh): Q, a ring of K and V tiles,
    and 1024 bytes to align the swizzle atoms."""
    stages = 4 if block_q == 128 else 3
    return 2 * (block_q * head_dim + 2 * stages * block_k * head_dim) + 1024


@functools.lru_cache(maxsize=256)
def _rule_params(rule, heads: int, device: int):
    """The rule's per-head parameters as a float32 device array (natural-log units; the kernel
    converts to its log2 units), uploaded once per (rule, heads, device)."""
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(rule.kernel_params(heads).astype(np.float32))


#: The host image of ``psa::ForwardParams`` (gpu/forward_params.cuh): same fields, same order,
#: C alignment. Pointers travel as uint64.
_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in ("q", "k", "v", "out")]
    + [(f"{x}_{axis}_stride", np.int64) for x in ("q", "k", "v", "out")
       for axis in ("batch", "head", "row")]
    + [(name, np.uint64) for name in ("row_offsets", "row_indices", "rule_params", "lse",
                                      "recall_bound", "kept", "visited")]
    + [(name, np.int32) for name in ("n_queries", "n_keys", "head_group", "capacity")]
    + [("scale_log2", np.float32), ("want_stats", np.int32), ("out_float32", np.int32)],
    align=True)


_TENSOR_MAP_DTYPE = np.dtype((np.uint64, 16))  # CUtensorMap: 128 opaque bytes


def _ws_params_dtype():
    """The host image of ``psa::WarpSpecializedParams``: three tensor maps, then
    ``ForwardParams``, the whole padded to the struct's 64-byte alignment."""
    base = 3 * _TENSOR_MAP_DTYPE.itemsize
    size = base + _PARAMS_DTYPE.itemsize
    return np.dtype({"names": ["q_map", "k_map", "v_map", "base"],
                     "formats": [_TENSOR_MAP_DTYPE] * 3 + [_PARAMS_DTYPE],
                     "offsets": [0, 128, 256, base], "itemsize": -(-size // 64) * 64})


_WS_PARAMS_DTYPE = _ws_params_dtype()

# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion values (cuda.h).
_TMA_DATA_TYPES = {"float16": 6, "bfloat16": 9}
_TMA_SWIZZLE_128B = 3
_TMA_L2_PROMOTION_128B = 2


def _encode_with_cuda_bindings(dtype_code, address, dims, strides, box):
    from cuda.bindings import driver

    error, tensor_map = driver.cuTensorMapEncodeTiled(
        driver.CUtensorMapDataType(dtype_code), 4, address,
        [driver.cuuint64_t(d) for d in dims], [driver.cuuint64_t(s) for s in strides],
        [driver.cuuint32_t(b) for b in box], [driver.cuuint32_t(1)] * 4,
        driver.CUtensorMapInterleave(0), driver.CUtensorMapSwizzle(_TMA_SWIZZLE_128B),
        driver.CUtensorMapL2promotion(_TMA_L2_PROMOTION_128B),
        driver.CUtensorMapFloatOOBfill(0))
    if int(error) != 0:
        return None, f"cuTensorMapEncodeTiled returned {error}"
    import ctypes

    return np.frombuffer(ctypes.string_at(tensor_map.getPtr(), 128), dtype=np.uint64), None


@functools.lru_cache(maxsize=1)
def _libcuda_encode():
    import ctypes

    function = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p,
                         u64p, u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _encode_with_libcuda(dtype_code, address, dims, strides, box):
    import ctypes

    buffer = ctypes.create_string_buffer(128 + 64)  # the map must sit on 64 bytes
    aligned = -(-ctypes.addressof(buffer) // 64) * 64
    error = _libcuda_encode()(
        ctypes.c_void_p(aligned), dtype_code, 4, ctypes.c_void_p(address),
        (ctypes.c_uint64 * 4)(*dims), (ctypes.c_uint64 * 3)(*strides),
        (ctypes.c_uint32 * 4)(*box), (ctypes.c_uint32 * 4)(1, 1, 1, 1), 0, _TMA_SWIZZLE_128B,
        _TMA_L2_PROMOTION_128B, 0)
    if error != 0:
        return None, f"cuTensorMapEncodeTiled returned CUresult {error}"
    return np.frombuffer(ctypes.string_at(aligned, 128), dtype=np.uint64), None


@functools.lru_cache(maxsize=256)
def _tensor_map(dtype_name, address, shape, strides, box_rows):
    """The TMA descriptor of a (B, H, N, D) tensor (element strides), read in boxes of 64
    columns x ``box_rows`` rows with the 128-byte swizzle, rows past N zero-filled: 16 uint64,
    or None with the reason when the driver rejects it. Cached per tensor (address, shape,
    strides): equal keys always encode to the same descriptor."""
    B, H, N, D = shape
    item = 2
    dims = (D, N, H, B)
    byte_strides = tuple(int(s) * item for s in (strides[2], strides[1], strides[0]))
    box = (64, box_rows, 1, 1)
    code = _TMA_DATA_TYPES[dtype_name]
    try:
        return _encode_with_cuda_bindings(code, address, dims, byte_strides, box)
    except Exception:  # cuda-bindings absent, or a version whose call differs: libcuda itself
        return _encode_with_libcuda(code, address, dims, byte_strides, box)


def _tma_ready(cupy, x, box_rows):
    """``(x, descriptor)``: ``x`` itself when the driver encodes its strides, else a contiguous
    copy (a stride the TMA unit cannot express, e.g. 0 for a broadcast head)."""
    key = (_dtype_name(x), int(x.data.ptr), tuple(x.shape),
           tuple(s // x.itemsize for s in x.strides), box_rows)
    descriptor, reason = _tensor_map(*key)
    if descriptor is None and not x.flags.c_contiguous:
        x = cupy.ascontiguousarray(x)
        key = (key[0], int(x.data.ptr), tuple(x.shape),
               tuple(s // x.itemsize for s in x.strides), box_rows)
        descriptor, reason = _tensor_map(*key)
    if descriptor is None:
        raise ValueError(f"the sm90_ws kernel cannot describe an input of shape {x.shape} and "
                         f"strides {x.strides} to the TMA unit: {reason}")
    return x, descriptor


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


def _device_int32(cupy, name, x, shape):
    """A plan array as a C-contiguous int32 CuPy array of ``shape`` (no copy when it is one)."""
    x = cupy.ascontiguousarray(cupy.asarray(x), dtype=cupy.int32)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"plan.{name} has shape {tuple(x.shape)}; these inputs need {shape}")
    return x


def forward(q, k, v, plan, rule, scale, want_stats, out_dtype=None, warps=None, kernel=None, *,
            _ablation=()):
    """Fused forward of the backend contract (``docs/internals.rst``); no host synchronisation.

    Parameters
    ----------
    q : cupy.ndarray ``(B, Hq, Nq, D)``
        bfloat16 or float16; any strides (copied when the head dim is not contiguous or rows
        are not 16-byte aligned).
    k, v : cupy.ndarray ``(B, Hkv, Nk, D)``
        Same dtype as ``q``; ``Hq % Hkv == 0``.
    plan : pysparse_attn.Plan
        CSR visit lists (``row_offsets``, ``row_indices``), validated upstream; ``plan.block``
        must be a supported tile size. Rows with no visited tile give O = 0, LSE = -inf.
    rule : SkipRule or None
        In-loop skip rule; its parameter may be one per query head.
    scale : float
        Logit scale (> 0).
    want_stats : bool
        Also return the kept/visited bitmaps and the recall bound.
    out_dtype : numpy dtype, optional
        ``numpy.float32`` writes O in float32 (unrounded); default the input dtype.
    warps : int, optional
        Warps per CTA of the mma.sync kernel, overriding :data:`WARPS` (for benchmarks; 4 or
        ``Bq / 16``).
    kernel : {"wgmma", "sm90_ws", "mma_sync"}, optional
        Forward family (:data:`KERNELS`); :func:`default_kernel` when None. ``"sm90_ws"``, the
        warp-specialised TMA kernel, is the default on Hopper.
    _ablation : tuple of str, private
        Timing-only ``PSA_ABLATE_*`` variants of the wgmma kernel (bench/forward_ablation.py;
        their results are wrong by design), or ``PSA_WS_SERIAL_SCORES``, the serial schedule
        of the sm90_ws kernel (same results, other timing). Not reachable from the public API.

    Returns
    -------
    out, lse, kept, visited, recall_bound
        ``out`` in ``out_dtype``, ``lse`` and ``recall_bound`` float32, bitmaps bool
        ``(B, Hq, nq, nk)``; the last three are None when ``want_stats`` is false.
    """
    import cupy

    dtype_name = _dtype_name(q)
    for name, x in (("k", k), ("v", v)):
        if _dtype_name(x) != dtype_name:
            raise TypeError(f"{name} has dtype {_dtype_name(x)} but q has {dtype_name}")
    if dtype_name not in _ELEMENTS:
        raise TypeError(f"q must be bfloat16 or float16 on the cupy backend, got {dtype_name} "
                        "(the API decides whether float32 may run in bfloat16)")
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
    if out_dtype is None:
        out_dtype = q.dtype
    elif np.dtype(out_dtype).name == "float32":
        out_dtype = np.dtype(np.float32)
    elif np.dtype(out_dtype).name != dtype_name:
        raise TypeError(f"out_dtype must be None, float32 or the input dtype ({dtype_name}), "
                        f"got {out_dtype}")
    functor = rule_functor(rule)
    device = _device_id()
    kernel = kernel or default_kernel()
    warps = warps or WARPS[(D, block[0])]
    function, shared, threads = _forward_kernel(device, kernel, dtype_name, D, block[0], functor,
                                                warps, tuple(_ablation))

    q, k, v = (_kernel_ready(cupy, x) for x in (q, k, v))
    if kernel == "sm90_ws":  # TMA descriptors (a copy where the driver rejects the strides)
        (q, q_map), (k, k_map), (v, v_map) = (
            _tma_ready(cupy, x, rows) for x, rows in ((q, block[0]), (k, block[1]), (v, block[1])))
        maps = (q_map, k_map, v_map)
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    offsets = _device_int32(cupy, "row_offsets", plan.row_offsets, (B, Hq, nq + 1))
    capacity = int(plan.row_indices.shape[-1])
    indices = _device_int32(cupy, "row_indices", plan.row_indices, (B, Hq, capacity))

    out = cupy.empty((B, Hq, Nq, D), dtype=out_dtype)
    lse = cupy.empty((B, Hq, Nq), dtype=cupy.float32)
    if want_stats:
        kept = cupy.zeros((B, Hq, nq, nk), dtype=cupy.bool_)
        visited = cupy.zeros((B, Hq, nq, nk), dtype=cupy.bool_)
        bound = cupy.empty((B, Hq, Nq), dtype=cupy.float32)
    rule_params = None if functor == NO_SKIP_FUNCTOR else _rule_params(rule, Hq, device)

    params = np.zeros((), dtype=_PARAMS_DTYPE)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        params[name] = x.data.ptr
        for axis, stride in zip(("batch", "head", "row"), x.strides[:3]):
            params[f"{name}_{axis}_stride"] = stride // x.itemsize
    params["row_offsets"], params["row_indices"] = offsets.data.ptr, indices.data.ptr
    params["rule_params"] = 0 if rule_params is None else rule_params.data.ptr
    params["lse"] = lse.data.ptr
    if want_stats:  # the kernel never touches these pointers otherwise
        params["recall_bound"], params["kept"] = bound.data.ptr, kept.data.ptr
        params["visited"] = visited.data.ptr
    params["n_queries"], params["n_keys"] = Nq, Nk
    params["head_group"], params["capacity"] = Hq // Hkv, capacity
    params["scale_log2"] = scale * LOG2E
    params["want_stats"] = bool(want_stats)
    params["out_float32"] = out.dtype == np.float32
    if kernel == "sm90_ws":
        ws_params = np.zeros((), dtype=_WS_PARAMS_DTYPE)
        ws_params["q_map"], ws_params["k_map"], ws_params["v_map"] = maps
        ws_params["base"] = params
        function((nq, Hq, B), (threads,), (ws_params[()],), shared_mem=shared)
    else:
        function((nq, Hq, B), (threads,), (params[()],), shared_mem=shared)
    if not want_stats:
        return out, lse, None, None, None
    return out, lse, kept, visited, bound


def _plan_module():
    return _raw_module("plan_select.cu", tuple(PLAN_INSTANCES.values()))


@functools.lru_cache(maxsize=None)
def _plan_function_cached(key, device):
    return _plan_module().get_function(PLAN_INSTANCES[key])


def _plan_function(key):
    """A compiled plan-stage kernel, looked up once per device."""
    import cupy

    return _plan_function_cached(key, cupy.cuda.Device().id)


def _tile_means(cupy, x, tile, factor):
    """float32 ``(B, H, n_tiles, D)`` means of each tile's valid rows, times ``factor``."""
    B, H, N, D = x.shape
    x = _kernel_ready(cupy, x)
    n_tiles = tile_count(N, tile)
    means = cupy.empty((B, H, n_tiles, D), dtype=cupy.float32)
    kernel = _plan_function(("tile_means", _dtype_name(x), D))
    kernel((n_tiles, H, B), ((D // 8) * _MEAN_ROW_GROUPS[D],),
           (x, *_element_strides(x), np.int32(N), np.int32(tile), np.float32(factor), means))
    return means


def fused_block_scores(q, k, block, scale):
    """Block scores of docs/design.rst section 3 for 16-bit CuPy inputs: float32 ``(B, Hq, nq, nk)``.

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
    kernel = _plan_function(("block_scores", D))
    kernel(((group * nq + 15) // 16, Hkv, B), (256,),
           (q_means, k_means, np.int32(nq), np.int32(nk), np.int32(group), scores))
    return scores


def _fused_scores(q):
    """Whether :func:`fused_block_scores` takes these inputs (16-bit, a kernel head dim)."""
    return _dtype_name(q) in _ELEMENTS and q.shape[-1] in _HEAD_DIMS


def plan_block_scores(q, k, block, scale):
    """The block scores the GPU plan builder orders and selects by, float32 ``(B, Hq, nq, nk)``:
    :func:`fused_block_scores` for 16-bit inputs of a kernel head dim, else the estimator on
    float32 copies (what :func:`build_plan` computes itself when given none)."""
    import cupy

    if _fused_scores(q):
        return fused_block_scores(q, k, block, scale)
    f32 = cupy.float32
    return _generic_block_scores(cupy, q.astype(f32, copy=False), k.astype(f32, copy=False),
                                 block, scale)


def build_plan(xp, q, k, selector, order, peak, block, scale, linear="marginal", *, mask=None,
               scores=None):
    """The plan of ``selector`` on the GPU, with no host round trip.

    The same selection methods as :func:`pysparse_attn._plan.build_plan`, accelerated: for
    16-bit inputs with ``select`` None, :class:`BlockMask`, :class:`TopK`, :class:`TopP` or the
    SLA split (or a trusted ``mask`` bitmap, as the generic builder takes it), block scores come
    from :func:`fused_block_scores` (or the caller's ``scores``, from :func:`plan_block_scores`),
    then one kernel sorts each query tile's scores in shared memory and writes its visit list
    (and, for the SLA split, its marginal row). Every size comes from the shapes and the
    selector (``max_visits``), never from device data. TopK, the SLA split and dense plans have
    rows of one known length, so their CSR offsets are a constant ramp and the kernel's padded
    lists *are* the CSR indices; TopP and mask lists are compacted on the device. Float32
    inputs and more than 4096 key tiles use the generic builder, ranking by the same
    :func:`plan_block_scores`.
    """
    import cupy

    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    shape = (B, Hq, Nq, Nk)
    n_pow2 = 1 << max(0, (nk - 1).bit_length())
    if isinstance(selector, BlockMask):
        mask, selector = cupy.broadcast_to(cupy.asarray(selector.mask, dtype=cupy.bool_),
                                           (B, Hq, nq, nk)), None
    fused = (xp is cupy and _fused_scores(q)
             and (selector is None or isinstance(selector, (TopK, TopP, SlaSplit)))
             and n_pow2 <= _MAX_SORTED_TILES)
    width = max_visits_of(selector, nk)
    if fused and selector is None and mask is None and order == "natural":
        row_indices = cupy.broadcast_to(cupy.arange(nk, dtype=cupy.int32), (B, Hq, nq, nk))
        return trusted_plan(shape, block, _ramp(cupy, B, Hq, nq, nk),
                            cupy.ascontiguousarray(row_indices).reshape(B, Hq, nq * nk),
                            order=order, max_visits=nk)
    if not fused:
        needs_scores = order != "natural" or isinstance(selector, (TopK, TopP, SlaSplit))
        if needs_scores and scores is None:
            scores = plan_block_scores(q, k, block, scale)
        return _generic_build_plan(xp, q, k, selector, order, peak, block, scale, linear,
                                   mask=mask, scores=scores)

    top_p, keep = 0.0, width
    marginal, write_marginal, marginal_begin, marginal_end = None, 0, 0, 0
    if isinstance(selector, TopP):
        top_p, keep = float(selector.p), 0
    elif isinstance(selector, SlaSplit):
        n_critical, n_negligible = selector.counts(nk)
        marginal = cupy.empty((B, Hq, nq, nk), dtype=cupy.bool_)
        write_marginal = 1
        marginal_begin, marginal_end = {
            "marginal": (n_critical, nk - n_negligible),
            "complement": (n_critical, nk),
            "global": (0, nk)}[linear]
    if scores is None:
        scores = fused_block_scores(q, k, block, scale)
    visit = cupy.empty((B, Hq, nq, width), dtype=cupy.int32)
    count = cupy.empty((B, Hq, nq), dtype=cupy.int32)
    if mask is not None:
        mask = cupy.ascontiguousarray(mask)
    kernel, shared = _select_kernel(n_pow2)
    kernel((nq, Hq, B), (_SELECT_THREADS,),
           (cupy.ascontiguousarray(scores, dtype=cupy.float32), np.int32(nk), np.int32(n_pow2),
            np.int32(keep), np.float32(top_p), np.int32(_ORDER_CODES[order]), np.int32(peak),
            visit, np.int32(width), count,
            marginal if marginal is not None else _unused_bytes(cupy), np.int32(write_marginal),
            np.int32(marginal_begin), np.int32(marginal_end),
            mask if mask is not None else _unused_bytes(cupy), np.int32(mask is not None)),
           shared_mem=shared)
    if keep > 0 and mask is None:  # every row keeps exactly `width` tiles
        row_offsets, row_indices = _ramp(cupy, B, Hq, nq, width), visit.reshape(B, Hq, nq * width)
    else:
        row_offsets, row_indices = rows_from_padded(cupy, visit, count)
    return trusted_plan(shape, block, row_offsets, row_indices, order=order, max_visits=width,
                        marginal=marginal)


def _ramp(cupy, B, H, nq, width):
    """Offsets of rows that all have ``width`` entries.

    Computed per call on the device (two small kernels), never cached: an array first filled
    inside a CUDA-graph capture holds its values only once the graph is replayed.
    """
    ramp = cupy.arange(nq + 1, dtype=cupy.int32) * np.int32(width)
    return cupy.ascontiguousarray(cupy.broadcast_to(ramp, (B, H, nq + 1)))


@functools.lru_cache(maxsize=None)
def _unused_bytes_of(device):
    import cupy

    return cupy.empty((1,), dtype=cupy.bool_)


def _unused_bytes(cupy):
    """A placeholder byte pointer for a kernel argument the call leaves unread."""
    return _unused_bytes_of(cupy.cuda.Device().id)


def _select_kernel(n_pow2):
    """The selection kernel and its shared-memory size (at most 33 KiB: 8 bytes a tile for
    4096 tiles plus the scan, under the 48 KiB default, so no attribute to raise)."""
    return _plan_function(("select_tiles",)), 8 * n_pow2 + 4 * _SELECT_THREADS


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


def _grads_name(side: str, dtype_name: str, feature_map: str) -> str:
    return f"psa::linear_{side}_grads<{_WORDS[dtype_name]}, {_FEATURE_CODES[feature_map]}>"


#: Head dims of the fused key side (``linear_key_tile_grads``: 16-bit inputs, 64-key tiles);
#: other cases take the batched GEMMs and ``linear_key_grads``.
KEY_TILE_HEAD_DIMS = (64, 128)
_KEY_TILE_ROWS = 64      # KeyTileLayout::kRows in gpu/linear_branch.cu
_KEY_TILE_THREADS = 128  # KeyTileLayout::kThreads
#: False sends every case through the GEMMs (tests and benchmarks compare the two paths).
_FUSED_KEY_SIDE = True


def _key_tile_name(dtype_name: str, feature_map: str, head_dim: int) -> str:
    return (f"psa::linear_key_tile_grads<{_WORDS[dtype_name]}, {_FEATURE_CODES[feature_map]}, "
            f"{head_dim}>")


def _key_tile_shared_bytes(head_dim: int) -> int:
    """``KeyTileLayout<HEAD_DIM>::kSharedBytes`` (the kernel traps on a smaller launch): the
    operands (dH_J, phi(K_J), V_J in bfloat16), then, in the same memory, dPhi in float32 rows
    of ``head_dim + 8``."""
    return max(2 * (head_dim * head_dim + 2 * _KEY_TILE_ROWS * head_dim),
               4 * _KEY_TILE_ROWS * (head_dim + 8))


#: Instances of gpu/linear_branch.cu: feature maps per (input dtype, map, query side), the
#: merge per (sparse output dtype, output dtype), and the backward's row stages per (side,
#: input dtype, map).
LINEAR_INSTANCES = {
    **{("features", dtype, name, query): _features_name(dtype, name, query)
       for dtype in _WORDS for name in _FEATURE_CODES for query in (False, True)},
    **{("merge", sparse, out): _merge_name(sparse, out) for sparse in _WORDS for out in _WORDS},
    **{(f"{side}_grads", dtype, name): _grads_name(side, dtype, name)
       for side in ("query", "key") for dtype in _WORDS for name in _FEATURE_CODES},
    ("pad_rows",): "psa::linear_pad_rows",
    **{("key_tile_grads", dtype, name, head_dim): _key_tile_name(dtype, name, head_dim)
       for dtype in ("bfloat16", "float16") for name in _FEATURE_CODES
       for head_dim in KEY_TILE_HEAD_DIMS},
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


def _gemm(m, n, k, a, lda, b, ldb, c, ldc, *, types, a_t=False, b_t=False, batch=1,
          strides=(0, 0, 0), compute=_COMPUTE_32F):
    """Row-major ``C (m x n) = op(A) op(B)`` by cuBLAS on the current stream.

    ``op(A)`` is ``m x k`` (``A`` stored ``k x m`` when ``a_t``), ``op(B)`` is ``k x n``; the
    leading dimensions are row strides in elements. ``a``, ``b``, ``c`` are the CuPy arrays
    whose memory the operands start at (strides between batch items in elements); ``types``
    is the pair (operand type name, output type name). cuBLAS is column-major: it computes
    ``C^T``.
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


def _linear_states(q, k, v, marginal, block, feature_map, eps, weight=None, mode=None):
    """The forward's pieces, kept for the backward: a dict with the GEMM operands ``phi_k``,
    ``v_tiles`` (zero-padded to whole key tiles), ``phi_q`` (phi(q) / denominator, zero-padded
    to whole query tiles), ``states`` (``H_I`` per query tile, or one ``H`` per kv head for
    ``mode="global"``, with ``W^T`` folded in when ``weight`` is given), ``z`` and its
    ``z_layout`` as ``linear_features`` reads it, and the sizes."""
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
    q, k = (_unit_stride(cupy, x) for x in (q, k))
    phi_k, tile_z = _features(cupy, k, block_k, feature_map, query=False)
    # V in the operand type, contiguous and zero-padded to whole key tiles like phi(K): every
    # per-tile GEMM is then one strided batch (cuBLAS through CuPy has no pointer-array Ex GEMM).
    keys_padded = nk * block_k
    v_tiles = _row_padded(cupy, v, keys_padded, _operand_dtype(dtype_name))
    flags = None
    if mode == "global":
        # One state per kv head over all keys: no tile states at all.
        state = cupy.empty((B, Hkv, D, D), dtype=cupy.float32)
        _gemm(D, D, keys_padded, phi_k, D, v_tiles, D, state, D, types=(operand, "float32"),
              a_t=True, batch=B * Hkv, strides=(keys_padded * D, keys_padded * D, D * D))
        z = tile_z.sum(axis=2)                                          # (B, Hkv, D)
        if weight is not None:  # (O_l) W^T = phi(q) (H W^T) / den, W in float32
            state = cupy.matmul(state, weight.T.astype(cupy.float32, copy=False))
        states = cupy.ascontiguousarray(state.astype(_operand_dtype(dtype_name)))
        z_layout = (Hkv, group, 0)
    else:
        tile_h = cupy.empty((B, Hkv, nk, D, D), dtype=_operand_dtype(dtype_name))
        _gemm(D, D, block_k, phi_k, D, v_tiles, D, tile_h, D, types=types, a_t=True,
              batch=B * Hkv * nk, strides=(block_k * D, block_k * D, D * D))
        flags = cupy.ascontiguousarray(cupy.asarray(marginal).reshape(B, Hkv, group * nq, nk),
                                       dtype=cupy.float32)
        states = cupy.empty((B, Hkv, group * nq, D * D), dtype=_operand_dtype(dtype_name))
        _gemm(group * nq, D * D, nk, flags.astype(states.dtype), nk, tile_h, D * D, states,
              D * D, types=types, batch=B * Hkv,
              strides=(group * nq * nk, nk * D * D, group * nq * D * D))
        del tile_h
        z = cupy.matmul(flags, tile_z)                 # (B, Hkv, group * nq, D) = (B, Hq, nq, D)
        z_layout = (Hq, 1, 1)
    z = cupy.ascontiguousarray(z)
    phi_q, _ = _features(cupy, q, block_q, feature_map, query=True, z=z, z_layout=z_layout,
                         eps=eps)
    return dict(phi_k=phi_k, v_tiles=v_tiles, phi_q=phi_q, states=states, z=z,
                z_layout=z_layout, flags=flags, operand=operand, mode=mode,
                sizes=(B, Hq, Hkv, group, Nq, Nk, D, block_q, block_k, nq, nk))


def _state_product(parts, left, out, *, transpose_state=False):
    """``out = left @ state`` (``state^T`` with ``transpose_state``) for every query row:
    per query tile with ``H_I``, per kv head (its query heads' rows stacked) for ``"global"``.
    ``left`` and ``out`` are row-padded ``(B, Hq, nq * Bq, D)``; ``out`` float32 or the
    operand type."""
    B, Hq, Hkv, group, Nq, Nk, D, block_q, block_k, nq, nk = parts["sizes"]
    types = (parts["operand"], _dtype_name(out))
    if parts["mode"] == "global":
        rows = group * nq * block_q
        _gemm(rows, D, D, left, D, parts["states"], D, out, D, types=types,
              b_t=transpose_state, batch=B * Hkv, strides=(rows * D, D * D, rows * D))
    else:
        _gemm(block_q, D, D, left, D, parts["states"], D, out, D, types=types,
              b_t=transpose_state, batch=B * Hq * nq,
              strides=(block_q * D, D * D, block_q * D))


def _linear_output(q, k, v, marginal, block, feature_map, eps, weight=None, mode=None):
    """float32 ``(B, Hq, nq * Bq, D)``: ``O_l`` (rows padded to whole query tiles), or, for
    ``mode="global"`` with ``weight``, ``O_l W^T`` (W folded into the one state per head)."""
    import cupy

    parts = _linear_states(q, k, v, marginal, block, feature_map, eps, weight, mode)
    B, Hq, Nq, D = q.shape
    out = cupy.empty((B, Hq, parts["phi_q"].shape[2], D), dtype=cupy.float32)
    _state_product(parts, parts["phi_q"], out)
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
# Gradients of the sparse branch: gpu/attention_backward.cu (preprocess, dK/dV pass over the
# key-major lists, dQ by fp32 atomics (mma_sync), fp32 bulk reductions of 64-row tiles (the
# wgmma families) or a deterministic query-major pass), all queued on the
# current stream with no host read. The linear backward runs float32 CuPy GEMMs
# (pysparse_attn.branches.linear).

#: Warps per backward CTA for each head dim: four warps of 16 keys (dK/dV) or 16 query rows (dQ)
#: cover the 64 x 64 blocks the kernels work in (gpu/backward_tiles.cuh).
BACKWARD_WARPS = {64: 4, 128: 4}
_PREPROCESS_THREADS = 128


def _backward_names(element: str, head_dim: int) -> dict:
    """The stages of ``gpu/attention_backward.cu``, the mma_sync family."""
    warps = BACKWARD_WARPS[head_dim]
    return {
        "preprocess": f"psa::attention_backward_preprocess<{element}, {head_dim}>",
        "dkdv_accumulate_dq": f"psa::attention_backward_dkdv<{element}, {head_dim}, {warps}, true>",
        "dkdv": f"psa::attention_backward_dkdv<{element}, {head_dim}, {warps}, false>",
        "dq": f"psa::attention_backward_dq<{element}, {head_dim}, {warps}>",
        "dq_from_tiles": f"psa::attention_backward_dq_from_tiles<{element}, {head_dim}>",
    }


#: Every instance of the backward family, keyed by (stage, dtype name, head dim); stages:
#: ``"list_counts"`` and ``"lists"`` (the kept bitmap as CSR lists, two untemplated passes,
#: keys ``(stage, None, None)``), ``"preprocess"``, ``"dkdv_accumulate_dq"`` (dK/dV with dQ
#: added to an fp32 accumulator), ``"dkdv"`` (dK/dV alone, the deterministic mode), ``"dq"`` (the deterministic dQ pass) and
#: ``"dq_from_tiles"`` (dq from the wgmma families' tiled accumulator). The forward tile
#: (64 or 128 query rows) is a launch parameter, not a template argument.
BACKWARD_INSTANCES = {
    (stage, dtype, d): name
    for dtype, element in _ELEMENTS.items()
    for d in _HEAD_DIMS
    for stage, name in _backward_names(element, d).items()
}
BACKWARD_INSTANCES[("list_counts", None, None)] = "psa::attention_backward_list_counts"
BACKWARD_INSTANCES[("lists", None, None)] = "psa::attention_backward_lists"


def _backward_sm90_names(element: str, head_dim: int, key_tiles: int) -> dict:
    """The dK/dV stages of ``gpu/attention_backward_sm90.cu`` (wgmma, one warpgroup per 64-key
    tile, ``key_tiles`` tiles a CTA)."""
    return {
        "dkdv_accumulate_dq":
            f"psa::attention_backward_dkdv_sm90<{element}, {head_dim}, {key_tiles}, true>",
        "dkdv": f"psa::attention_backward_dkdv_sm90<{element}, {head_dim}, {key_tiles}, false>",
    }


class BackwardFamily(NamedTuple):
    """One dK/dV pass: where it runs, what compiles it and how it is launched."""

    runs_on: Optional[tuple]   # compute capabilities (major, minor); None: any >= 8.0
    source: str                # gpu/ file
    arch: Optional[str]        # NVRTC architecture; None: the device's own sm_XY
    key_tiles: int             # 64-key forward tiles a CTA covers (grid.x = ceil(nk / this))
    threads: int               # per CTA
    names: Callable            # (element, head dim) -> {stage: template instance}
    dq_tiles: bool = False     # its dQ accumulator: row layout (atomics) or tiles (bulk
    #                            reductions, BackwardParams::dq_tiles), then dq_from_tiles


#: Backward dK/dV families by name: the one table the launch, the instance tables, the compile
#: check and bench/gpu.py's sanitize step derive from. The lists, preprocess, deterministic dQ
#: pass and postprocess are the mma_sync module's whatever the family. ``"sm90"``: wgmma, two
#: warpgroups and 128 keys a CTA (FlashAttention-3's shape: half the dQ reductions of 64 keys);
#: ``"sm90_k64"``: the same kernel with one warpgroup and 64 keys (two CTAs an SM). Both stage
#: dQ in shared memory and add it by TMA bulk reductions (one 16 KB a 64-dim half) instead of
#: per-thread atomics, which took 37% (5% kept) and 26% (dense) of the pass on an H200
#: (bench/results/backward-v3-20261204). Which one a call gets: :func:`default_backward_kernel`.
BACKWARD_KERNELS = {
    # mma_sync's threads: BACKWARD_WARPS (per head dim) at the launch.
    "mma_sync": BackwardFamily(None, "attention_backward.cu", None, 1, 0, _backward_names),
    "sm90": BackwardFamily(((9, 0),), "attention_backward_sm90.cu", "sm_90a", 2, 256,
                           functools.partial(_backward_sm90_names, key_tiles=2), True),
    "sm90_k64": BackwardFamily(((9, 0),), "attention_backward_sm90.cu", "sm_90a", 1, 128,
                               functools.partial(_backward_sm90_names, key_tiles=1), True),
}


def backward_instances(kernel: str) -> dict:
    """Every instance of backward family ``kernel``, keyed (stage, dtype name, head dim); the
    mma_sync family's is :data:`BACKWARD_INSTANCES` (with its two untemplated lists kernels)."""
    if kernel == "mma_sync":
        return dict(BACKWARD_INSTANCES)
    names = BACKWARD_KERNELS[kernel].names
    return {(stage, dtype, d): name
            for dtype, element in _ELEMENTS.items()
            for d in _HEAD_DIMS
            for stage, name in names(element, d).items()}


#: The wgmma dK/dV families' instances, keyed (family, stage, dtype name, head dim): their two
#: dkdv stages only (the other stages are always the mma_sync family's).
BACKWARD_SM90_INSTANCES = {
    (kernel, *key): name
    for kernel, family in BACKWARD_KERNELS.items() if family.source != "attention_backward.cu"
    for key, name in backward_instances(kernel).items()
}


#: Up to this share of kept key tiles a query tile (a host-known bound: the plan's capacity over
#: nk) the 64-key wgmma CTA is the default: twice the CTAs and two an SM balance short, uneven
#: key-major lists. On an H200 at the Wan shape it ran an SLA kept set (5%) in 3.04 ms against
#: the 128-key CTA's 4.63 (bench/results/gpu-20261203; with the bulk dQ reductions 2.51 against
#: 4.45, bench/results/backward-v3-20261204/run4), while the dense backward took 54.5 ms
#: against 43.1 (bench/results/backward-v2.md).
SPARSE_BACKWARD_DENSITY = 0.25


def default_backward_kernel(density=None) -> str:
    """The dK/dV family for a kept set of at most ``density`` (None: unknown, taken as dense).

    ``"sm90_k64"`` up to :data:`SPARSE_BACKWARD_DENSITY`, ``"sm90"`` (wgmma, 128 keys a CTA)
    above it, where they run (compute capability 9.0); else ``"mma_sync"``: on an H200 the
    128-key CTA ran the dense backward in 43.1 ms against mma_sync's 78.0
    (bench/results/backward-v2.md; 40.4 ms with the bulk dQ reductions,
    bench/results/backward-v3-20261204)."""
    if backward_kernel_unavailable_reason("sm90") is not None:
        return "mma_sync"
    sparse = density is not None and density <= SPARSE_BACKWARD_DENSITY
    return "sm90_k64" if sparse else "sm90"


def backward_kernel_unavailable_reason(kernel: str):
    """Why backward family ``kernel`` cannot run on the current device, or ``None``."""
    if kernel not in BACKWARD_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(BACKWARD_KERNELS)}, got {kernel!r}")
    return _capability_reason(kernel, BACKWARD_KERNELS[kernel].runs_on)


_SHARED_PER_SM = 227 * 1024  # BackwardWarpgroupTraits::kSharedPerSm


def _backward_shared_bytes(stage: str, head_dim: int, kernel: str = "mma_sync") -> int:
    """Dynamic shared memory of a backward CTA (``BackwardTraits`` in gpu/backward_tiles.cuh,
    ``BackwardWarpgroupTraits`` in gpu/backward_tiles_sm90.cuh for the sm90 dK/dV passes)."""
    tile = 64 * head_dim
    if stage.startswith("dkdv") and kernel != "mma_sync":
        # K and V of the CTA's keys, 2 Q, 2 dO, dS^T (keys x 64); 2 x (LSE, delta) floats;
        # the dQ staging (64 rows of float32) unless the CTAs an SM would not fit it (they
        # then stage in the step's Q and dO); 1024 to align the swizzle atoms.
        key_tiles = BACKWARD_KERNELS[kernel].key_tiles
        keys = 64 * key_tiles
        layout = 2 * (2 * keys * head_dim + 4 * tile + keys * 64) + 2 * 2 * 64 * 4
        staging = 4 * tile
        ctas_per_sm = 2 if key_tiles == 1 else 1
        in_step_buffers = ctas_per_sm * (layout + staging + 1024) > _SHARED_PER_SM
        return layout + (0 if in_step_buffers else staging) + 1024
    if stage.startswith("dkdv"):  # K, V, 2 Q, 2 dO, dS^T (64 x 64); 2 x (LSE, delta) floats
        return 2 * (6 * tile + 64 * 64) + 2 * 2 * 64 * 4
    if stage == "dq":  # Q, dO, 2 K, 2 V
        return 2 * 6 * tile
    return 0


@functools.lru_cache(maxsize=None)
def _backward_kernel(device, stage, dtype_name, head_dim, kernel="mma_sync", ablation=()):
    """The compiled backward instance on ``device`` and its dynamic shared-memory size; one
    NVRTC module per (family, dtype, head dim) holds the family's stages. Only the dK/dV
    stages differ between families; the others always come from the mma_sync module.
    ``ablation``: variant macros of the wgmma dK/dV pass (``PSA_ABLATE_BWD_*``,
    ``PSA_BWD_*``; bench/backward_ablation.py)."""
    if not stage.startswith("dkdv"):
        kernel, ablation = "mma_sync", ()
    if ablation and BACKWARD_KERNELS[kernel].source == "attention_backward.cu":
        raise ValueError(f"timing variants exist for the wgmma dK/dV passes only, not {kernel!r}")
    untemplated = ("list_counts", "lists")
    if stage in untemplated:  # compiled with the first module asked for
        dtype_name, head_dim = next(iter(_ELEMENTS)), _HEAD_DIMS[0]
    family = BACKWARD_KERNELS[kernel]
    names = family.names(_ELEMENTS[dtype_name], head_dim)
    if kernel == "mma_sync":
        names.update({name: BACKWARD_INSTANCES[(name, None, None)] for name in untemplated})
    module = _raw_module(family.source, tuple(names.values()), family.arch,
                         tuple(f"-D{macro}" for macro in ablation))
    function = module.get_function(names[stage])
    shared = _backward_shared_bytes(stage, head_dim, kernel)
    _allow_shared(function, shared)
    return function, shared


#: The host image of ``psa::BackwardParams`` (gpu/backward_params.cuh): same fields, same order,
#: C alignment. Pointers travel as uint64.
_BACKWARD_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in ("q", "k", "v", "d_out", "out")]
    + [(f"{x}_{axis}_stride", np.int64) for x in ("q", "k", "v", "d_out", "out")
       for axis in ("batch", "head", "row")]
    + [(name, np.uint64) for name in ("lse", "out_bias", "delta_shift", "lse_log2", "delta",
                                      "dq_accumulator", "dq", "dk", "dv", "dq_addend",
                                      "dk_addend", "dv_addend")]
    + [(f"{name}_addend_slab", np.int64) for name in ("dq", "dk", "dv")]
    + [(name, np.uint64) for name in ("row_offsets", "row_indices", "col_offsets",
                                      "col_indices")]
    + [(name, np.int32) for name in ("n_queries", "n_keys", "n_rows_padded", "n_heads",
                                     "head_group", "block_q", "row_capacity", "col_capacity")]
    + [("scale", np.float32), ("scale_log2", np.float32), ("out_float32", np.int32),
       ("grad_float32", np.int32), ("dq_tiles", np.int32)],
    align=True)


_LIST_THREADS = 256  # kListThreads in gpu/attention_backward.cu
_LISTS_PER_CTA = 32  # kListsPerCta there
_MAX_LIST_SHARED = 48 * 1024  # one int a list (plus one) in the default shared memory


def _backward_addend(cupy, addend, shapes):
    """``addend`` as ``((array, slab stride in elements), ...)`` the kernels can read, or None.

    Each must be float32 of its shape; one whose rows are not contiguous with evenly spaced,
    16-byte aligned (b, h) slabs (the mma_sync preprocess reads it by float4) is copied
    contiguous.
    """
    if addend is None:
        return None
    if not isinstance(addend, (tuple, list)) or len(addend) != 3:
        raise TypeError("addend must be a tuple (dq, dk, dv) of float32 cupy arrays")
    ready = []
    for name, x, shape in zip(("dq", "dk", "dv"), addend, shapes):
        if not isinstance(x, cupy.ndarray) or x.dtype != np.float32 or tuple(x.shape) != shape:
            raise ValueError(f"addend's {name} must be a float32 cupy array of shape {shape}, "
                             f"got {type(x).__name__} {getattr(x, 'dtype', None)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        B, H, N, D = shape
        strides = [s // 4 for s in x.strides]
        slab = strides[1]
        if not (strides[3] == 1 and strides[2] == D and slab >= N * D and slab % 4 == 0
                and (B == 1 or strides[0] == H * slab) and x.data.ptr % 16 == 0
                and all(s % 4 == 0 for s in x.strides)):
            x = cupy.ascontiguousarray(x)
            slab = N * D
        ready.append((x, slab))
    return tuple(ready)


def _kept_lists(cupy, kept, block, shape):
    """The plan replaying ``kept`` (query-major, ascending) and its key-major transpose, both
    CSR over a capacity of ``nq * nk``, built on the device from the bitmap alone.

    Two kernels (``attention_backward_list_counts``, then ``attention_backward_lists``: a
    warp a list) where the tile counts fit the second one's shared memory; otherwise the
    array-API compaction of :meth:`pysparse_attn.Plan.from_kept` (``rows_from_positions``) on
    both directions.
    """
    from .._plan import Plan, rows_from_positions

    B, H, Nq, Nk = shape
    nq, nk = kept.shape[2], kept.shape[3]
    capacity = nq * nk
    if 4 * (max(nq, nk) + 1) > _MAX_LIST_SHARED:
        plan = Plan.from_kept(kept, block=block, shape=shape)
        by_key = cupy.swapaxes(kept, 2, 3)
        position = cupy.cumsum(by_key, axis=-1, dtype=cupy.int64) - 1
        col_offsets, col_indices = rows_from_positions(cupy, by_key, position, capacity)
        return plan, col_offsets, col_indices
    row_offsets = cupy.empty((B, H, nq + 1), dtype=cupy.int32)
    col_offsets = cupy.empty((B, H, nk + 1), dtype=cupy.int32)
    row_indices = cupy.full((B, H, capacity), -1, dtype=cupy.int32)
    col_indices = cupy.full((B, H, capacity), -1, dtype=cupy.int32)
    counts = cupy.empty((B * H, nq + nk), dtype=cupy.int32)
    grid = (B * H, 2, -(-max(nq, nk) // _LISTS_PER_CTA))
    device = _device_id()
    function, _ = _backward_kernel(device, "list_counts", None, None)
    function(grid, (_LIST_THREADS,), (kept, np.int32(nq), np.int32(nk), counts))
    function, _ = _backward_kernel(device, "lists", None, None)
    function(grid, (_LIST_THREADS,),
             (kept, np.int32(nq), np.int32(nk), counts, row_offsets, row_indices, col_offsets,
              col_indices), shared_mem=4 * (max(nq, nk) + 1))
    plan = trusted_plan(shape, block, row_offsets, row_indices, order="given", max_visits=nk)
    return plan, col_offsets, col_indices


def attention_backward(q, k, v, do, kept, block, scale, *, out=None, lse=None,
                       deterministic=False, grad_dtype=None, threads=None, kernel=None,
                       addend=None, density=None, _ablation=()):
    """(dq, dk, dv) of attention restricted to `kept`, on the GPU, no host synchronisation.

    Parameters
    ----------
    q, do : cupy.ndarray ``(B, Hq, Nq, D)``
        bfloat16 or float16, unit stride along D (any other strides; copied when rows are not
        16-byte aligned).
    k, v : cupy.ndarray ``(B, Hkv, Nk, D)``
        Same dtype; ``Hq % Hkv == 0``.
    kept : bool cupy.ndarray ``(B, Hq, nq, nk)``
        The tiles (of ``block``) whose P.V the forward accumulated.
    block : (int, int)
        ``(64, 64)`` or ``(128, 64)``.
    scale : float
        Logit scale (> 0).
    out, lse : cupy.ndarray, optional
        The forward's output (like ``q``, its dtype or float32) and LSE (``(B, Hq, Nq)``
        float32, natural log, -inf for rows with no kept tile) over exactly this kept set.
        When either is None both are recomputed by :func:`forward` on ``Plan.from_kept(kept)``.
        ``out`` may be a :class:`MergedOutput` (SLA's merged output and its linear terms):
        the output is used only through ``delta = rowsum(dO * O)``, which is then taken from
        it.
    deterministic : bool
        dQ by a separate pass per query tile (bitwise reproducible) instead of fp32 reductions
        into an accumulator (atomics or bulk reductions: order-dependent rounding).
    grad_dtype : dtype, optional
        Gradient dtype: None (float32), float32, or the input dtype.
    threads : ignored
        (an option of the cpu backend).
    kernel : {"mma_sync", "sm90", "sm90_k64"}, optional
        The dK/dV pass (:data:`BACKWARD_KERNELS`); None is :func:`default_backward_kernel` of
        ``density``. The sm90 families (wgmma, compute capability 9.0 only) take the same
        lists, preprocess, dQ modes and contract.
    addend : (dq, dk, dv) of float32 cupy.ndarray, optional
        Another branch's gradients (SLA's linear side), shaped like the result, unit stride
        along D and N: added inside the kernels' stores (and as the dQ accumulator's start),
        so the sum is rounded once to ``grad_dtype`` and no separate pass adds them.
    density : float, optional
        An upper bound, known on the host, on the share of key tiles a query tile keeps (a
        plan's list capacity over ``nk``); it picks the default kernel. None: unknown.
    _ablation : tuple of str, private
        Variants of the wgmma dK/dV pass (bench/backward_ablation.py): timing-only
        ``PSA_ABLATE_BWD_*`` (their gradients are wrong by design), or ``PSA_BWD_DQ_LAST``,
        the previous schedule (same gradients, up to dQ's summation order).

    Returns
    -------
    dq, dk, dv : cupy.ndarray
        C-contiguous ``(B, H, N, D)`` in ``grad_dtype`` (float32 when None). Key tiles nobody
        kept get exact zeros in dk/dv; rows with no kept tile get zero dq (the addend's
        values, with one).
    """
    import cupy

    del threads
    kernel = default_backward_kernel(density) if kernel is None else kernel
    reason = backward_kernel_unavailable_reason(kernel)
    if reason is not None:
        raise ValueError(reason)
    dtype_name = _dtype_name(q)
    for name, x in (("k", k), ("v", v), ("do", do)):
        if _dtype_name(x) != dtype_name:
            raise ValueError(f"{name} has dtype {_dtype_name(x)} but q has {dtype_name}")
    if dtype_name not in _ELEMENTS:
        raise ValueError(f"the cupy backward supports bfloat16 and float16 inputs, got q of "
                         f"dtype {dtype_name}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k and v must be 4-D (B, H, N, D)")
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if D not in _HEAD_DIMS:
        raise ValueError(f"q has head dim {D}; the cupy backward supports {list(_HEAD_DIMS)}")
    if tuple(k.shape) != (B, Hkv, Nk, D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must both have shape (B, Hkv, Nk, D) = {(B, Hkv, Nk, D)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k's {Hkv}")
    if tuple(do.shape) != tuple(q.shape):
        raise ValueError(f"do must have q's shape {tuple(q.shape)}, got {tuple(do.shape)}")
    block = tuple(int(b) for b in block)
    if block not in _BLOCKS:
        raise ValueError(f"block {block} is not supported by the cupy backward; supported: "
                         f"{list(_BLOCKS)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, block[1])
    if getattr(kept, "dtype", None) != np.bool_ or tuple(kept.shape) != (B, Hq, nq, nk):
        raise ValueError(f"kept must be a bool array of shape {(B, Hq, nq, nk)}, got "
                         f"{getattr(kept, 'dtype', None)} {tuple(getattr(kept, 'shape', ()))}")
    if grad_dtype is None or np.dtype(grad_dtype).name == "float32":
        grad_dtype = np.dtype(np.float32)
    elif np.dtype(grad_dtype).name != dtype_name:
        raise ValueError(f"grad_dtype must be None, float32 or the input dtype ({dtype_name}), "
                         f"got {grad_dtype}")
    grad_dtype = np.dtype(np.float32) if grad_dtype == np.float32 else q.dtype
    addend = _backward_addend(cupy, addend, ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))

    out, out_bias, delta_shift = _merged_terms(cupy, out, (B, Hq, Nq, D))

    kept = cupy.ascontiguousarray(kept)
    plan, col_offsets, col_indices = _kept_lists(cupy, kept, block, (B, Hq, Nq, Nk))
    if out is None or lse is None:
        out, lse = forward(q, k, v, plan, None, scale, False, out_dtype=np.float32)[:2]
        out_bias = delta_shift = None  # the sparse branch's own output
    if tuple(out.shape) != tuple(q.shape) or _dtype_name(out) not in (dtype_name, "float32"):
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {dtype_name} or "
                         f"float32, got {_dtype_name(out)} {tuple(out.shape)}")
    if tuple(lse.shape) != (B, Hq, Nq) or _dtype_name(lse) != "float32":
        raise ValueError(f"lse must be float32 of shape {(B, Hq, Nq)}, got {_dtype_name(lse)} "
                         f"{tuple(lse.shape)}")
    q, k, v, do, out = (_kernel_ready(cupy, x) for x in (q, k, v, do, out))
    lse = cupy.ascontiguousarray(lse)
    offsets = _device_int32(cupy, "row_offsets", plan.row_offsets, (B, Hq, nq + 1))
    indices = _device_int32(cupy, "row_indices", plan.row_indices, (B, Hq, plan.capacity))

    rows_padded = nq * block[0]
    lse_log2 = cupy.empty((B, Hq, rows_padded), dtype=cupy.float32)
    delta = cupy.empty((B, Hq, rows_padded), dtype=cupy.float32)
    family = BACKWARD_KERNELS[kernel]
    dq_tiles = family.dq_tiles and not deterministic
    if deterministic:
        accumulator = None
        dq = cupy.empty((B, Hq, Nq, D), dtype=grad_dtype)
    elif dq_tiles:  # bulk-reduced in 64-row tiles of every forward tile's rows
        accumulator = cupy.empty((B, Hq, rows_padded, D), dtype=cupy.float32)
        dq = cupy.empty((B, Hq, Nq, D), dtype=grad_dtype)
    else:
        accumulator = cupy.empty((B, Hq, Nq, D), dtype=cupy.float32)
        dq = accumulator if grad_dtype == np.float32 else None
    dk = cupy.empty((B, Hkv, Nk, D), dtype=grad_dtype)
    dv = cupy.empty((B, Hkv, Nk, D), dtype=grad_dtype)

    params = np.zeros((), dtype=_BACKWARD_PARAMS_DTYPE)
    for name, x in (("q", q), ("k", k), ("v", v), ("d_out", do), ("out", out)):
        params[name] = x.data.ptr
        for axis, stride in zip(("batch", "head", "row"), x.strides[:3]):
            params[f"{name}_{axis}_stride"] = stride // x.itemsize
    params["lse"], params["lse_log2"], params["delta"] = (lse.data.ptr, lse_log2.data.ptr,
                                                          delta.data.ptr)
    params["out_bias"] = 0 if out_bias is None else out_bias.data.ptr
    params["delta_shift"] = 0 if delta_shift is None else delta_shift.data.ptr
    params["dq_accumulator"] = 0 if accumulator is None else accumulator.data.ptr
    params["dq"] = 0 if dq is None else dq.data.ptr
    params["dk"], params["dv"] = dk.data.ptr, dv.data.ptr
    for name, (x, slab) in zip(("dq", "dk", "dv"), addend or ()):
        params[f"{name}_addend"], params[f"{name}_addend_slab"] = x.data.ptr, slab
    params["row_offsets"], params["row_indices"] = offsets.data.ptr, indices.data.ptr
    params["col_offsets"], params["col_indices"] = col_offsets.data.ptr, col_indices.data.ptr
    params["n_queries"], params["n_keys"], params["n_rows_padded"] = Nq, Nk, rows_padded
    params["n_heads"], params["head_group"], params["block_q"] = Hq, Hq // Hkv, block[0]
    params["row_capacity"] = plan.capacity
    params["col_capacity"] = int(col_indices.shape[-1])
    params["scale"], params["scale_log2"] = scale, scale * LOG2E
    params["out_float32"] = out.dtype == np.float32
    params["grad_float32"] = grad_dtype == np.float32
    params["dq_tiles"] = dq_tiles
    args = (params[()],)

    device = _device_id()
    threads_per_cta = BACKWARD_WARPS[D] * 32
    rows_per_cta = _PREPROCESS_THREADS // (D // 8)
    function, _ = _backward_kernel(device, "preprocess", dtype_name, D)
    function((rows_padded // rows_per_cta, Hq, B), (_PREPROCESS_THREADS,), args)
    stage = "dkdv" if deterministic else "dkdv_accumulate_dq"
    function, shared = _backward_kernel(device, stage, dtype_name, D, kernel, tuple(_ablation))
    dkdv_threads = threads_per_cta if kernel == "mma_sync" else family.threads
    function((-(-nk // family.key_tiles), Hkv, B), (dkdv_threads,), args, shared_mem=shared)
    if deterministic:
        function, shared = _backward_kernel(device, "dq", dtype_name, D)
        function((rows_padded // 64, Hq, B), (threads_per_cta,), args, shared_mem=shared)
    elif dq_tiles:  # the tiles (plus the addend) to dq, rounded once
        function, _ = _backward_kernel(device, "dq_from_tiles", dtype_name, D)
        function((rows_padded // 64, Hq, B), (128,), args)
    elif dq is None:  # postprocess: the (already scaled) fp32 accumulator to the grad dtype
        dq = accumulator.astype(grad_dtype)
    return dq, dk, dv


def _row_padded(cupy, x, rows, dtype):
    """``x`` ``(B, H, N, D)`` copied into a contiguous ``(B, H, rows, D)`` buffer of ``dtype``
    whose rows past N are zero (a GEMM operand aligned with whole tiles).

    A same-dtype ``x`` whose (B, H) slabs are evenly spaced contiguous (N, D) blocks, 16-byte
    aligned, goes by one pass of ``linear_pad_rows`` (16-byte vectors, the zero rows in the
    same pass): CuPy's copy into the strided view ran at a quarter of the bandwidth on an H200
    (0.24 ms at the Wan shape), a pitched ``cudaMemcpy2DAsync`` at 1.7 TB/s (0.12 ms).
    """
    B, H, N, D = x.shape
    padded = cupy.empty((B, H, rows, D), dtype=dtype)
    item = padded.itemsize
    slab = x.strides[1]
    if (x.dtype == padded.dtype and x.strides[3] == item and x.strides[2] == D * item
            and (B == 1 or x.strides[0] == H * slab) and slab >= N * D * item
            and (D * item) % 16 == 0 and slab % 16 == 0 and x.data.ptr % 16 == 0
            and B * H * rows > 0):
        row_vectors = D * item // 16
        total = B * H * rows * row_vectors
        blocks = max(1, min(-(-total // _LINEAR_THREADS), 1 << 16))
        _linear_function(("pad_rows",))(
            (blocks,), (_LINEAR_THREADS,),
            (x, np.int64(slab // 16), np.int32(N), np.int32(rows), np.int32(row_vectors),
             np.int64(total), padded))
        return padded
    padded[:, :, :N] = x
    if rows > N:
        padded[:, :, N:] = 0
    return padded


def _launch_rows(key, grid, args):
    _linear_function(key)(grid, (_LINEAR_THREADS,), args)


def _linear_grads(parts, q, k, feature_map, eps, g_operand, row_dot=None):
    """``(dq, dk, dv)`` float32 of the linear branch given its cotangent ``g`` (row-padded, in
    the GEMM operand type); ``parts`` are the forward's (:func:`_linear_states`). Per query
    tile ``dH_I = (phi(Q_I)/den)^T g_I`` and ``G = g H_I^T`` (batched GEMMs), the query rows'
    stage (``dq``, ``dZ_I``; it takes ``c_i = g_i . O_l,i`` as ``phi(q_i) . G_i / den_i``, so
    neither ``O_l`` nor a float32 ``g`` is needed), the key tiles' ``dH_J = M^T dH_I`` (one
    GEMM of the 0/1 marginal matrix, tensor cores), ``dv = phi(K_J) dH_J`` and ``V_J
    dH_J^T`` (batched GEMMs), then the key rows' stage (``dk``). With ``row_dot`` (float32
    ``(B, Hq, Nq)``) the query stage also writes ``c_i`` there."""
    import cupy

    B, Hq, Hkv, group, Nq, Nk, D, block_q, block_k, nq, nk = parts["sizes"]
    operand, phi_q, phi_k = parts["operand"], parts["phi_q"], parts["phi_k"]
    op_dtype = phi_q.dtype
    rows_q, rows_k = nq * block_q, nk * block_k
    f32 = cupy.float32
    g_h = cupy.empty((B, Hq, rows_q, D), dtype=f32)
    _state_product(parts, g_operand, g_h, transpose_state=True)

    q = _unit_stride(cupy, q)
    dq = cupy.empty((B, Hq, Nq, D), dtype=f32)
    dz_query = cupy.empty((B, Hq, nq, D), dtype=f32)
    z_heads, z_group, z_per_tile = parts["z_layout"]
    _launch_rows(("query_grads", _dtype_name(q), feature_map), (nq, Hq, B),
                 (q, *_element_strides(q), np.int32(Hq), np.int32(Nq), np.int32(block_q),
                  np.int32(D), parts["z"], np.int32(z_heads), np.int32(z_group),
                  np.int32(z_per_tile), np.float32(eps), g_h, dq, dz_query,
                  np.uint64(0) if row_dot is None else row_dot))
    del g_h

    if parts["mode"] == "global":
        # One state per kv head: dH sums every query row of the group, no aggregation.
        d_state = cupy.empty((B, Hkv, D, D), dtype=op_dtype)
        rows = group * rows_q
        _gemm(D, D, rows, phi_q, D, g_operand, D, d_state, D, types=(operand, operand),
              a_t=True, batch=B * Hkv, strides=(rows * D, rows * D, D * D))
        dz_key = cupy.ascontiguousarray(dz_query.reshape(B, Hkv, group * nq, D).sum(axis=2))
        key_batch, key_rows, dz_layout = B * Hkv, rows_k, (Hkv, 1, 0)
    else:
        d_query_states = cupy.empty((B, Hq, nq, D, D), dtype=op_dtype)
        _gemm(D, D, block_q, phi_q, D, g_operand, D, d_query_states, D,
              types=(operand, operand), a_t=True, batch=B * Hq * nq,
              strides=(block_q * D, block_q * D, D * D))
        flags = parts["flags"]                                  # (B, Hkv, group * nq, nk)
        d_state = cupy.empty((B, Hkv, nk, D, D), dtype=op_dtype)
        _gemm(nk, D * D, group * nq, flags.astype(op_dtype), nk, d_query_states, D * D,
              d_state, D * D, types=(operand, operand), a_t=True, batch=B * Hkv,
              strides=(group * nq * nk, group * nq * D * D, nk * D * D))
        del d_query_states
        dz_key = cupy.matmul(cupy.swapaxes(flags, -1, -2),
                             dz_query.reshape(B, Hkv, group * nq, D))   # (B, Hkv, nk, D)
        key_batch, key_rows, dz_layout = B * Hkv * nk, block_k, (Hkv, 1, 1)
    dz_key = cupy.ascontiguousarray(dz_key)
    k = _unit_stride(cupy, k)
    dk = cupy.empty((B, Hkv, Nk, D), dtype=f32)
    dv = cupy.empty((B, Hkv, rows_k, D), dtype=f32)
    if (_FUSED_KEY_SIDE and operand == "bfloat16" and D in KEY_TILE_HEAD_DIMS
            and block_k == _KEY_TILE_ROWS):
        # dv, V dH_J^T and dk in one pass over the key tiles (one read of dH_J).
        function = _linear_function(("key_tile_grads", _dtype_name(k), feature_map, D))
        shared = _key_tile_shared_bytes(D)
        _allow_shared(function, shared)
        function((nk, Hkv, B), (_KEY_TILE_THREADS,),
                 (k, *_element_strides(k), np.int32(Hkv), np.int32(Nk), phi_k,
                  parts["v_tiles"], d_state, np.int32(parts["mode"] != "global"), dz_key,
                  *(np.int32(x) for x in dz_layout), dk, dv), shared_mem=shared)
        return dq, dk, dv[:, :, :Nk]
    state_stride = D * D  # one state a key tile, or one a kv head for "global"
    d_phi_k = cupy.empty((B, Hkv, rows_k, D), dtype=f32)
    strides = (key_rows * D, state_stride, key_rows * D)
    _gemm(key_rows, D, D, phi_k, D, d_state, D, dv, D, types=(operand, "float32"),
          batch=key_batch, strides=strides)
    _gemm(key_rows, D, D, parts["v_tiles"], D, d_state, D, d_phi_k, D,
          types=(operand, "float32"), b_t=True, batch=key_batch, strides=strides)
    del d_state

    _launch_rows(("key_grads", _dtype_name(k), feature_map), (nk, Hkv, B),
                 (k, *_element_strides(k), np.int32(Hkv), np.int32(Nk), np.int32(block_k),
                  np.int32(D), d_phi_k, dz_key, *(np.int32(x) for x in dz_layout), dk))
    return dq, dk, dv[:, :, :Nk]


def _operand_copy(x32, operand, op_dtype):
    """A float32 GEMM operand in the operand type (itself when that is float32)."""
    return x32 if operand == "float32" else x32.astype(op_dtype)


def linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear, mode=None):
    """Gradients ``(dq, dk, dv)`` of :func:`linear_branch` on the GPU, float32.

    The pipeline of :func:`sla_linear_vjp` given ``d_linear = dL/dO_l`` directly: the
    forward's states once, then batched GEMMs and the two row stages of
    ``gpu/linear_branch.cu``; nothing leaves the device.
    """
    import cupy

    if marginal is None:
        B, Hq, Nq, D = q.shape
        zeros = cupy.zeros((B, k.shape[1], k.shape[2], D), dtype=cupy.float32)
        return cupy.zeros((B, Hq, Nq, D), dtype=cupy.float32), zeros, zeros.copy()
    parts = _linear_states(q, k, v, cupy.asarray(marginal), block, feature_map, eps, mode=mode)
    rows_q = parts["phi_q"].shape[2]
    g = _row_padded(cupy, d_linear, rows_q, cupy.float32)
    g_operand = _operand_copy(g, parts["operand"], parts["phi_q"].dtype)
    return _linear_grads(parts, q, k, feature_map, eps, g_operand)


class MergedOutput(NamedTuple):
    """SLA's merged forward output standing for its sparse branch's ``O_s`` in
    :func:`attention_backward` (its ``out``): ``merged = O_s + Y + b`` with ``Y = O_l W^T``.

    The sparse backward needs ``O_s`` only through ``delta = rowsum(dO * O_s)``, which is
    ``rowsum(dO * (merged - b)) - rowsum(dO * Y)``, and ``rowsum(dO * Y) = rowsum((dO W) *
    O_l)`` falls out of the linear side's own backward (its ``c_i``): so ``O_s`` is never
    formed (no ``Y`` GEMM, no float32 ``(B, Hq, Nq, D)`` pass). ``bias`` is float32 ``(D,)``
    or None; ``linear_row_dot`` float32 ``(B, Hq, Nq)`` or None (``W = 0``).
    """

    merged: object
    bias: object
    linear_row_dot: object


def _merged_terms(cupy, out, shape):
    """``(out, bias, row_dot)`` of an ``out`` argument: a :class:`MergedOutput` checked and
    made kernel-ready, or a plain array with no terms."""
    if not isinstance(out, MergedOutput):
        return out, None, None
    B, Hq, Nq, D = shape
    merged, bias, row_dot = out
    if bias is not None:
        if not isinstance(bias, cupy.ndarray) or bias.dtype != np.float32 or bias.shape != (D,):
            raise ValueError(f"out.bias must be a float32 cupy array of shape {(D,)}, got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)} "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        bias = cupy.ascontiguousarray(bias)
        if bias.data.ptr % 16:  # the preprocess reads it by float4
            bias = bias.copy()
    if row_dot is not None:
        if (not isinstance(row_dot, cupy.ndarray) or row_dot.dtype != np.float32
                or row_dot.shape != (B, Hq, Nq)):
            raise ValueError(f"out.linear_row_dot must be a float32 cupy array of shape "
                             f"{(B, Hq, Nq)}, got {getattr(row_dot, 'dtype', None)} "
                             f"{tuple(getattr(row_dot, 'shape', ()))}")
        row_dot = cupy.ascontiguousarray(row_dot)
    return merged, bias, row_dot


def sla_linear_vjp(q, k, v, d_out, marginal, block, feature_map, eps, weight, bias, out,
                   mode=None):
    """The SLA backward's linear side on the GPU: ``(grads, dW, db, o_sparse)``.

    One pipeline, no host synchronisation: the forward's states (``phi``, ``H_I``, ``Z_I``)
    are computed once and reused; ``O_l`` (in the GEMM operand type: only ``dW`` reads it),
    ``dW = dO^T O_l`` and ``db = 1^T dO`` as single GEMMs over every row (``db`` from ``dO``
    in its own dtype), ``g = dO W`` as one GEMM (operand type), then :func:`_linear_grads`.
    With the forward's merged ``out`` its last item is a :class:`MergedOutput` (``out``,
    ``b`` and ``rowsum(dO * O_l W^T) = g . O_l`` per row, from the query rows' stage), which
    :func:`attention_backward` takes for ``O_s``: the sparse backward then needs no forward
    and ``O_s`` is never formed (else None). ``grads`` is None when ``weight`` is None (the
    branch does not reach the output). 16-bit inputs run every GEMM on bfloat16 operands with
    float32 accumulation; float32 inputs run float32 GEMMs.
    """
    import cupy

    B, Hq, Nq, D = q.shape
    f32 = cupy.float32
    bias32 = None if bias is None else cupy.ascontiguousarray(bias.astype(f32, copy=False))
    if marginal is None:  # no marginal tile: O_l = 0, so dW = 0 and only the bias remains
        d_bias = d_out.astype(f32).sum(axis=(0, 1, 2))
        o_sparse = None if out is None else MergedOutput(out, bias32, None)
        return None, cupy.zeros((D, D), dtype=f32), d_bias, o_sparse
    parts = _linear_states(q, k, v, cupy.asarray(marginal), block, feature_map, eps, mode=mode)
    operand, op_dtype = parts["operand"], parts["phi_q"].dtype
    rows_q = parts["phi_q"].shape[2]
    total_rows = B * Hq * rows_q
    # O_l only as dW's operand, rounded once by the GEMM (the query stage needs no O_l).
    o_operand = cupy.empty((B, Hq, rows_q, D), dtype=op_dtype)
    _state_product(parts, parts["phi_q"], o_operand)
    do_operand = _row_padded(cupy, d_out, rows_q, op_dtype)   # padding rows are zero
    d_weight = cupy.empty((D, D), dtype=f32)
    _gemm(D, D, total_rows, do_operand, D, o_operand, D, d_weight, D,
          types=(operand, "float32"), a_t=True)
    # db = 1^T dO as a GEMM (a CuPy reduction over the leading axes took 9 ms at the Wan
    # shape on an H200), from dO in its own dtype: a float16 dO is not rounded to bf16 here.
    own = _dtype_name(d_out)
    do_own = do_operand if own == operand else _row_padded(cupy, d_out, rows_q, d_out.dtype)
    ones = cupy.ones((1, total_rows), dtype=f32)
    ones = ones if own == "float32" else ones.astype(d_out.dtype)
    d_bias = cupy.empty((1, D), dtype=f32)
    _gemm(1, D, total_rows, ones, total_rows, do_own, D, d_bias, D, types=(own, "float32"))
    d_bias = d_bias.reshape(D)
    if weight is None:
        return None, d_weight, d_bias, None if out is None else MergedOutput(out, bias32, None)
    weight_operand = cupy.ascontiguousarray(weight.astype(op_dtype))
    g_operand = cupy.empty((B, Hq, rows_q, D), dtype=op_dtype)   # g = dO W, rounded once
    _gemm(total_rows, D, D, do_operand, D, weight_operand, D, g_operand, D,
          types=(operand, operand))
    row_dot = None if out is None else cupy.empty((B, Hq, Nq), dtype=f32)
    grads = _linear_grads(parts, q, k, feature_map, eps, g_operand, row_dot)
    return grads, d_weight, d_bias, None if out is None else MergedOutput(out, bias32, row_dot)
