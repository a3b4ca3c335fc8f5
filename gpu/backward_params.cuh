// The launch parameters of the backward kernels (attention_backward.cu: preprocess, dK/dV pass,
// deterministic dQ pass), passed by value as one __grid_constant__ struct.
//
// The host side is pysparse_attn/backends/cupy.py (`_BACKWARD_PARAMS_DTYPE`, a NumPy structured
// dtype with the same fields in the same order, aligned as C++ aligns this struct): a field
// added here must be added there.
#pragma once

namespace psa {

struct BackwardParams {
    // Inputs (B, H, N, D) by element strides; the head dim is contiguous. d_out is like q.
    const unsigned short* q;
    const unsigned short* k;
    const unsigned short* v;
    const unsigned short* d_out;
    // The forward's output over the same kept set, 16-bit (the input type) or float32.
    const void* out;
    long long q_batch_stride, q_head_stride, q_row_stride;
    long long k_batch_stride, k_head_stride, k_row_stride;
    long long v_batch_stride, v_head_stride, v_row_stride;
    long long d_out_batch_stride, d_out_head_stride, d_out_row_stride;
    long long out_batch_stride, out_head_stride, out_row_stride;
    // The forward's LSE (B, Hq, Nq), natural log, -inf for rows with no kept tile.
    const float* lse;
    // Where `out` is SLA's merged output O_s + Y + b (Y = O_l W^T) rather than O_s: b (D floats)
    // and rowsum(dO * Y) (B, Hq, Nq), each null when absent. delta = rowsum(dO * (out - b)) -
    // rowsum(dO * Y) is then rowsum(dO * O_s) without O_s ever being formed.
    const float* out_bias;
    const float* delta_shift;
    // Preprocess results, (B, Hq, n_rows_padded): the LSE in log2 units (+inf where P must be
    // exactly 0: rows with no kept tile and padded rows) and delta = rowsum(dO * O) (0 there).
    float* lse_log2;
    float* delta;
    // dQ accumulator (B, Hq, Nq, D) float32, already scaled; the preprocess starts it at
    // dq_addend (zero without one).
    float* dq_accumulator;
    // Gradients, C-contiguous (B, H, N, D), 16-bit (the input type) or float32.
    void* dq;
    void* dk;
    void* dv;
    // Another branch's float32 gradients (SLA's linear side) added before the one rounding to the
    // gradient dtype, or null. Rows contiguous; (b, h) slabs `*_addend_slab` elements apart.
    const float* dq_addend;
    const float* dk_addend;
    const float* dv_addend;
    long long dq_addend_slab, dk_addend_slab, dv_addend_slab;
    // Query-major lists (the forward's plan) and their key-major transpose, CSR per (b, Hq).
    const int* row_offsets;   // (B, Hq, nq + 1)
    const int* row_indices;   // (B, Hq, row_capacity)
    const int* col_offsets;   // (B, Hq, nk + 1)
    const int* col_indices;   // (B, Hq, col_capacity), ascending query tiles
    int n_queries, n_keys;
    int n_rows_padded;        // nq * block_q
    int n_heads;              // Hq
    int head_group;           // Hq / Hkv
    int block_q;              // forward query tile: 64 or 128 rows (walked as 64-row steps)
    int row_capacity, col_capacity;
    float scale;              // logit scale
    float scale_log2;         // scale times log2 e
    int out_float32;
    int grad_float32;
    // The dQ accumulator's layout: 0 rows (B, Hq, Nq, D), added to by atomics and started at
    // dq_addend by the preprocess; 1 tiles (DqTileLayout in backward_tiles.cuh, n_rows_padded
    // rows), added to by bulk reductions, started at zero, and turned into dq (plus
    // dq_addend) by attention_backward_dq_from_tiles.
    int dq_tiles;
};

}  // namespace psa
