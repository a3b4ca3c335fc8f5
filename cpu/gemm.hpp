// Register-blocked matrix product for the small tiles of the attention kernels.
//
// C (M x N) = or += A (M x K) * B (K x N), N a multiple of the vector width. The micro-kernel
// keeps an MR x (NV vectors) block of C in registers, broadcasts one element of A per row and
// streams one row of B per step. With AVX-512's 32 registers, 6 x 4 vectors of C is 24
// registers, leaving room for the B row and the broadcast; with the 16 registers of AVX2/SSE,
// 6 x 2 (12) does the same. Every product of the tile loops (S^T = K Q^T, O += P V and the
// backward's products) has this shape, so this is the only inner loop that needs to be fast.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.hpp"

namespace psa {

constexpr int kMicroRows = 6;
constexpr int kMicroVectors = kVectorBytes == 64 ? 4 : 2;

template <typename T, int MR, int NV, bool ACCUMULATE>
inline void micro_kernel(int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                         int64_t ldb, T* C, int64_t ldc) {
    constexpr int W = Simd<T>::lanes;
    Vec<T> c[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j)
            c[i][j] = ACCUMULATE ? load_vec(C + i * ldc + j * W) : Vec<T>{};
    for (int64_t p = 0; p < K; ++p) {
        Vec<T> b[NV];
        for (int j = 0; j < NV; ++j) b[j] = load_vec(B + p * ldb + j * W);
        for (int i = 0; i < MR; ++i) {
            const T a = A[i * a_row + p * a_col];
            for (int j = 0; j < NV; ++j) c[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) store_vec(C + i * ldc + j * W, c[i][j]);
}

template <typename T, int MR, bool ACCUMULATE>
inline void micro_kernel_nv(int nv, int64_t K, const T* A, int64_t a_row, int64_t a_col,
                            const T* B, int64_t ldb, T* C, int64_t ldc) {
    switch (nv) {
        case 1: micro_kernel<T, MR, 1, ACCUMULATE>(K, A, a_row, a_col, B, ldb, C, ldc); break;
        case 2: micro_kernel<T, MR, 2, ACCUMULATE>(K, A, a_row, a_col, B, ldb, C, ldc); break;
        case 3: micro_kernel<T, MR, 3, ACCUMULATE>(K, A, a_row, a_col, B, ldb, C, ldc); break;
        default: micro_kernel<T, MR, 4, ACCUMULATE>(K, A, a_row, a_col, B, ldb, C, ldc); break;
    }
}

// C = A * B (ACCUMULATE false) or C += A * B (true), where A(i, p) = A[i * a_row + p * a_col]
// may be any strided view (a transposed buffer, or an input tensor read in place: A's
// elements are broadcast one at a time, so its layout costs nothing). B and C are row-major
// with leading dimensions ldb, ldc (ldb may be negative); N must be a multiple of the lanes.
template <typename T, bool ACCUMULATE>
void gemm_strided(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col,
                  const T* B, int64_t ldb, T* C, int64_t ldc) {
    constexpr int W = Simd<T>::lanes;
    for (int64_t n0 = 0; n0 < N; n0 += kMicroVectors * W) {
        const int nv = static_cast<int>(std::min<int64_t>(kMicroVectors, (N - n0) / W));
        const T* b = B + n0;
        for (int64_t m0 = 0; m0 < M; m0 += kMicroRows) {
            const T* a = A + m0 * a_row;
            T* c = C + m0 * ldc + n0;
            const int64_t ar = a_row, ac = a_col;
            switch (std::min<int64_t>(kMicroRows, M - m0)) {
                case 1: micro_kernel_nv<T, 1, ACCUMULATE>(nv, K, a, ar, ac, b, ldb, c, ldc); break;
                case 2: micro_kernel_nv<T, 2, ACCUMULATE>(nv, K, a, ar, ac, b, ldb, c, ldc); break;
                case 3: micro_kernel_nv<T, 3, ACCUMULATE>(nv, K, a, ar, ac, b, ldb, c, ldc); break;
                case 4: micro_kernel_nv<T, 4, ACCUMULATE>(nv, K, a, ar, ac, b, ldb, c, ldc); break;
                case 5: micro_kernel_nv<T, 5, ACCUMULATE>(nv, K, a, ar, ac, b, ldb, c, ldc); break;
                default: micro_kernel_nv<T, 6, ACCUMULATE>(nv, K, a, ar, ac, b, ldb, c, ldc); break;
            }
        }
    }
}

// The row-major case: A(i, p) = A[i * lda + p].
template <typename T, bool ACCUMULATE>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
          T* C, int64_t ldc) {
    gemm_strided<T, ACCUMULATE>(M, N, K, A, lda, 1, B, ldb, C, ldc);
}

}  // namespace psa
