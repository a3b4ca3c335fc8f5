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
    const int32_t* visit;  // (B, Hq, nq, max_count), -1 past count
    const int32_t* count;  // (B, Hq, nq)
    int64_t max_count;
    int rule_code;
    double rule_param;
    double scale;
    void* out;             // (B, Hq, Nq, D), input dtype
    float* lse;            // (B, Hq, Nq)
    uint8_t* kept;         // (B, Hq, nq, nk) zero-initialised, or null
    uint8_t* visited;      // same, or null
    float* recall_bound;   // (B, Hq, Nq) or null
};

struct BackwardArgs {
    Shape shape;
    TensorArg q, k, v, d_out;
    const uint8_t* kept;   // (B, Hq, nq, nk)
    double scale;
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
    void* out;                // forward: O_l (B, Hq, Nq, D), accumulation dtype
    TensorArg d_linear;       // backward: dL/dO_l (B, Hq, Nq, D), accumulation dtype
    void* dq;                 // backward outputs, accumulation dtype
    void* dk;
    void* dv;
};

void attention_forward(const ForwardArgs& args);
void attention_backward(const BackwardArgs& args);
void linear_forward(const LinearArgs& args);
void linear_backward(const LinearArgs& args);

}  // namespace psa
