// The launch parameters of both forward kernels (attention_forward.cu, mma.sync;
// attention_forward_sm90.cu, wgmma), passed by value as one __grid_constant__ struct.
//
// The host side is pysparse_attn/backends/cupy.py (`_PARAMS_DTYPE`, a NumPy structured dtype
// with the same fields in the same order, aligned as C++ aligns this struct): a field added
// here must be added there.
#pragma once

namespace psa {

struct ForwardParams {
    // Inputs (B, H, N, D) by element strides; the head dim is contiguous.
    const unsigned short* q;
    const unsigned short* k;
    const unsigned short* v;
    // Output (B, Hq, Nq, D), 16-bit (the input type) or float32 when out_float32.
    void* out;
    long long q_batch_stride, q_head_stride, q_row_stride;
    long long k_batch_stride, k_head_stride, k_row_stride;
    long long v_batch_stride, v_head_stride, v_row_stride;
    long long out_batch_stride, out_head_stride, out_row_stride;
    // Plan (CSR per (batch, head), FRONTEND_V2.md section 1): query tile i of (b, h) visits
    // row_indices[(b*H + h)*capacity + row_offsets[(b*H + h)*(nq + 1) + i] .. + i + 1].
    const int* row_offsets;  // (B, Hq, nq + 1)
    const int* row_indices;  // (B, Hq, capacity)
    // Skip rule: one parameter per query head, natural-log units (SkipRule.kernel_params);
    // null for NoSkip.
    const float* rule_params;
    // Statistics: LSE always; the rest only when want_stats.
    float* lse;                // (B, Hq, Nq)
    float* recall_bound;       // (B, Hq, Nq)
    unsigned char* kept;       // (B, Hq, nq, nk), zero-initialised
    unsigned char* visited;    // (B, Hq, nq, nk), zero-initialised
    int n_queries, n_keys;
    int head_group;            // Hq / Hkv
    int capacity;
    float scale_log2;          // logit scale times log2 e
    int want_stats;
    int out_float32;
};

}  // namespace psa
