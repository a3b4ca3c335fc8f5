// The C++ entry points of the CPU backend, as seen by the Cython wrapper (_cpu.pyx).
//
// Every tensor argument is a canonical (B, H, N, D) array given by its data pointer and its
// element strides, so both layouts reach the kernels without a copy. Outputs are contiguous
// arrays allocated by the caller. Each entry point runs an OpenMP parallel loop and touches no
// Python object, so the wrapper calls it with the GIL released.
#pragma once

#include <cstdint>

namespace psa {

struct TensorArg {
    const void* data;
    int64_t stride[4];  // in elements
};

struct Shape {
    int dtype;  // a DTypeCode (dtypes.hpp)
    int64_t batch, q_heads, kv_heads, q_len, kv_len, dim;
    int64_t block_q, block_k;
    int threads;  // <= 0: the OpenMP default (OMP_NUM_THREADS)
};

struct ForwardArgs {
    Shape shape;
    TensorArg q, k, v;
    // The plan, CSR per (batch, head): query tile i of (b, h) visits
    // row_indices[(b*Hq + h)*capacity + row_offsets[(b*Hq + h)*(nq + 1) + i] .. + i + 1].
    const int32_t* row_offsets;  // (B, Hq, nq + 1)
    const int32_t* row_indices;  // (B, Hq, capacity)
    int64_t capacity;
    const char* rule_functor;    // a functor of gpu/skip_rules.cuh, e.g. "psa::BlasstRule"
    const double* rule_params;   // (Hq,) natural-log units (SkipRule.kernel_params); null: NoSkip
    double scale;
    int out_float32;             // write O in float32 instead of the input dtype
    void* out;                   // (B, Hq, Nq, D), input dtype or float32
    void* lse;                   // (B, Hq, Nq), accumulation dtype (float64 for float64)
    uint8_t* kept;               // (B, Hq, nq, nk) zero-initialised, or null
    uint8_t* visited;            // same, or null
    void* recall_bound;          // (B, Hq, Nq) accumulation dtype, or null
};

struct BackwardArgs {
    Shape shape;
    TensorArg q, k, v, d_out;
    const uint8_t* kept;   // (B, Hq, nq, nk)
    double scale;
    // The forward's saved statistics, contiguous (B, Hq, Nq) in the accumulation dtype, or
    // null: each one given is used instead of recomputing it from the kept tiles.
    const void* saved_lse;    // natural-log LSE of the kept set
    const void* saved_delta;  // Delta_i = dO_i . O_i with the forward's O
    void* dq;              // (B, Hq, Nq, D), accumulation dtype (float32, float64 for float64)
    void* dk;              // (B, Hkv, Nk, D), same dtype
    void* dv;
};

enum FeatureMap : int { FEATURE_SOFTMAX = 0, FEATURE_ELU1 = 1, FEATURE_RELU = 2 };

struct LinearArgs {
    Shape shape;
    TensorArg q, k, v;
    const uint8_t* marginal;  // (B, Hq, nq, nk)
    int feature_map;
    double eps;
    void* out;                // forward: O_l (B, Hq, Nq, D), accumulation dtype; backward:
                              // the same O_l as well when not null
    TensorArg d_linear;       // backward: dL/dO_l (B, Hq, Nq, D), accumulation dtype
    void* dq;                 // backward outputs, accumulation dtype
    void* dk;
    void* dv;
};

// C (m x n) = A (m x k) B (k x n), all float32 or all float64 (dtype), A and B read through
// element strides (a transposed view costs nothing), C contiguous. The CPU backend's small
// dense products (SLA's projection O_l W^T, dO W and dW = dO^T O_l) go through this instead of
// NumPy's BLAS: BLAS worker threads spin for a while after each call and took the cores from
// the kernels' OpenMP threads (an SLA step on 2 cores ran 1.6x slower for it).
struct MatmulArgs {
    int dtype;    // DTYPE_F32 or DTYPE_F64
    int threads;  // <= 0: the OpenMP default
    int64_t m, n, k;
    const void* a;
    int64_t a_row, a_col;
    const void* b;
    int64_t b_row, b_col;
    void* c;
};

void attention_forward(const ForwardArgs& args);
void attention_backward(const BackwardArgs& args);
void linear_forward(const LinearArgs& args);
void linear_backward(const LinearArgs& args);
void matmul(const MatmulArgs& args);

}  // namespace psa
