# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin Cython bridge to the C++/OpenMP kernels of the CPU backend (``cpu/kernels.hpp``).

Callers (``pysparse_attn.backends.cpu``) validate shapes and allocate every output; this module
only turns NumPy arrays into pointers and element strides and runs the kernel with the GIL
released. Inputs are read through their strides, never copied.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t

import numpy as np

cimport numpy as cnp

cnp.import_array()


cdef extern from "kernels.hpp" namespace "psa" nogil:
    cdef struct TensorArg:
        const void* data
        int64_t stride[4]

    cdef struct Shape:
        int dtype
        int64_t batch, q_heads, kv_heads, q_len, kv_len, dim
        int64_t block_q, block_k
        int threads

    cdef struct ForwardArgs:
        Shape shape
        TensorArg q, k, v
        const int32_t* row_offsets
        const int32_t* row_indices
        int64_t capacity
        const char* rule_functor
        const double* rule_params
        double scale
        int out_float32
        void* out
        void* lse
        uint8_t* kept
        uint8_t* visited
        void* recall_bound

    cdef struct BackwardArgs:
        Shape shape
        TensorArg q, k, v, d_out
        const uint8_t* kept
        double scale
        const void* saved_lse
        const void* saved_delta
        void* dq
        void* dk
        void* dv

    cdef struct LinearArgs:
        Shape shape
        TensorArg q, k, v
        const uint8_t* marginal
        int feature_map
        double eps
        void* out
        TensorArg d_linear
        void* dq
        void* dk
        void* dv

    void c_attention_forward "psa::attention_forward"(const ForwardArgs& args) except +
    void c_attention_backward "psa::attention_backward"(const BackwardArgs& args) except +
    cdef struct MatmulArgs:
        int dtype
        int threads
        int64_t m, n, k
        const void* a
        int64_t a_row, a_col
        const void* b
        int64_t b_row, b_col
        void* c

    void c_linear_forward "psa::linear_forward"(const LinearArgs& args) except +
    void c_linear_backward "psa::linear_backward"(const LinearArgs& args) except +
    void c_matmul "psa::matmul"(const MatmulArgs& args) except +


DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
FEATURE_MAPS = {"softmax": 0, "elu1": 1, "relu": 2}


cdef void* _pointer(a):
    """Data pointer of an ndarray (None gives NULL)."""
    if a is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef TensorArg _tensor(cnp.ndarray a):
    cdef TensorArg t
    cdef int axis
    cdef Py_ssize_t itemsize = a.itemsize
    t.data = cnp.PyArray_DATA(a)
    for axis in range(4):
        if a.strides[axis] % itemsize:
            raise ValueError("array strides must be whole elements")
        t.stride[axis] = a.strides[axis] // itemsize
    return t


cdef Shape _shape(cnp.ndarray q, cnp.ndarray k, block, threads):
    cdef Shape s
    s.dtype = DTYPE_CODES[q.dtype.name]
    s.batch, s.q_heads, s.q_len, s.dim = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    s.kv_heads, s.kv_len = k.shape[1], k.shape[2]
    s.block_q, s.block_k = int(block[0]), int(block[1])
    s.threads = int(threads)
    return s


def forward(q, k, v, row_offsets, row_indices, block, str rule_functor, rule_params,
            double scale, out, lse, kept, visited, recall_bound, int threads):
    """Run the fused tile loop; writes ``out``, ``lse`` and the optional stats in place.

    ``row_offsets`` (B, H, nq + 1) and ``row_indices`` (B, H, capacity) are C-contiguous int32
    (the plan's CSR rows, validated by the caller); ``rule_functor`` names a functor of
    ``gpu/skip_rules.cuh`` and ``rule_params`` is its C-contiguous float64 (H,) parameter
    array (None for ``psa::NoSkip``). ``out`` has the input dtype or float32; ``lse`` and
    ``recall_bound`` the accumulation dtype (float64 for float64 inputs, else float32).
    """
    cdef ForwardArgs args
    cdef bytes functor = rule_functor.encode("ascii")
    args.shape = _shape(q, k, block, threads)
    args.q, args.k, args.v = _tensor(q), _tensor(k), _tensor(v)
    args.row_offsets = <const int32_t*>_pointer(row_offsets)
    args.row_indices = <const int32_t*>_pointer(row_indices)
    args.capacity = row_indices.shape[2]
    args.rule_functor = functor
    args.rule_params = <const double*>_pointer(rule_params)
    args.scale = scale
    args.out_float32 = out.dtype != q.dtype and out.dtype.name == "float32"
    args.out = _pointer(out)
    args.lse = _pointer(lse)
    args.kept = <uint8_t*>_pointer(kept)
    args.visited = <uint8_t*>_pointer(visited)
    args.recall_bound = _pointer(recall_bound)
    with nogil:
        c_attention_forward(args)


def backward(q, k, v, d_out, kept, block, double scale, dq, dk, dv, int threads,
             saved_lse=None, saved_delta=None):
    """Gradients of attention restricted to ``kept``; writes ``dq``, ``dk``, ``dv`` in place.

    ``saved_lse`` and ``saved_delta`` (C-contiguous (B, H, Nq) in the accumulation dtype, or
    None) replace the recomputation of the forward's LSE and of ``dO . O``.
    """
    cdef BackwardArgs args
    args.shape = _shape(q, k, block, threads)
    args.q, args.k, args.v, args.d_out = _tensor(q), _tensor(k), _tensor(v), _tensor(d_out)
    args.kept = <const uint8_t*>_pointer(kept)
    args.scale = scale
    args.saved_lse = _pointer(saved_lse)
    args.saved_delta = _pointer(saved_delta)
    args.dq, args.dk, args.dv = _pointer(dq), _pointer(dk), _pointer(dv)
    with nogil:
        c_attention_backward(args)


cdef LinearArgs _linear_args(q, k, v, marginal, block, feature_map, double eps, int threads):
    cdef LinearArgs args
    args.shape = _shape(q, k, block, threads)
    args.q, args.k, args.v = _tensor(q), _tensor(k), _tensor(v)
    args.marginal = <const uint8_t*>_pointer(marginal)
    args.feature_map = FEATURE_MAPS[feature_map]
    args.eps = eps
    args.out = NULL
    args.d_linear.data = NULL
    args.dq = args.dk = args.dv = NULL
    return args


def linear_forward(q, k, v, marginal, block, feature_map, double eps, out, int threads):
    """SLA linear branch; writes ``out`` in place."""
    cdef LinearArgs args = _linear_args(q, k, v, marginal, block, feature_map, eps, threads)
    args.out = _pointer(out)
    with nogil:
        c_linear_forward(args)


def linear_backward(q, k, v, marginal, block, feature_map, double eps, d_linear, dq, dk, dv,
                    int threads, out=None):
    """Gradients of the linear branch given ``d_linear``; writes ``dq``, ``dk``, ``dv`` (and
    the branch's output into ``out`` when given)."""
    cdef LinearArgs args = _linear_args(q, k, v, marginal, block, feature_map, eps, threads)
    args.d_linear = _tensor(d_linear)
    args.dq, args.dk, args.dv = _pointer(dq), _pointer(dk), _pointer(dv)
    args.out = _pointer(out)
    with nogil:
        c_linear_backward(args)


def matmul(cnp.ndarray a, cnp.ndarray b, cnp.ndarray out, int threads):
    """``out = a @ b`` (2-D, one float dtype, ``out`` contiguous); a and b through strides."""
    cdef MatmulArgs args
    cdef Py_ssize_t itemsize = a.itemsize
    for x in (a, b):
        if x.strides[0] % itemsize or x.strides[1] % itemsize:
            raise ValueError("array strides must be whole elements")
    args.dtype = DTYPE_CODES[a.dtype.name]
    args.threads = threads
    args.m, args.k, args.n = a.shape[0], a.shape[1], b.shape[1]
    args.a, args.b, args.c = cnp.PyArray_DATA(a), cnp.PyArray_DATA(b), cnp.PyArray_DATA(out)
    args.a_row, args.a_col = a.strides[0] // itemsize, a.strides[1] // itemsize
    args.b_row, args.b_col = b.strides[0] // itemsize, b.strides[1] // itemsize
    with nogil:
        c_matmul(args)
