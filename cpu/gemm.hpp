// Register-blocked matrix product for the small tiles of the attention kernels.
//
// C (M x N) = or += A (M x K) * B (K x N), all row-major with leading dimensions, N a multiple
// of the vector width. The micro-kernel keeps an MR x (NV vectors) block of C in registers,
// broadcasts one element of A per row and streams one row of B per step: 6 x 4 vectors of
// float32 is 24 of the 32 AVX-512 registers, leaving room for the B row and the broadcast.
// Every product of the tile loop (Q.K^T with K pre-transposed, P.V, and the backward's
// products) has this shape, so this is the only inner loop that needs to be fast.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.hpp"

namespace psa {

constexpr int kMicroRows = 6;
constexpr int kMicroVectors = 4;

template <typename T, int MR, int NV, bool ACCUMULATE>
inline void micro_kernel(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                         int64_t ldc) {
    constexpr int W = Simd<T>::lanes;
    Vec<T> c[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j)
            c[i][j] = ACCUMULATE ? load_vec(C + i * ldc + j * W) : Vec<T>{};
    for (int64_t p = 0; p < K; ++p) {
        Vec<T> b[NV];
        for (int j = 0; j < NV; ++j) b[j] = load_vec(B + p * ldb + j * W);
        for (int i = 0; i < MR; ++i) {
            const T a = A[i * lda + p];
            for (int j = 0; j < NV; ++j) c[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) store_vec(C + i * ldc + j * W, c[i][j]);
}

template <typename T, int MR, bool ACCUMULATE>
inline void micro_kernel_nv(int nv, int64_t K, const T* A, int64_t lda, const T* B,
                            int64_t ldb, T* C, int64_t ldc) {
    switch (nv) {
        case 1: micro_kernel<T, MR, 1, ACCUMULATE>(K, A, lda, B, ldb, C, ldc); break;
        case 2: micro_kernel<T, MR, 2, ACCUMULATE>(K, A, lda, B, ldb, C, ldc); break;
        case 3: micro_kernel<T, MR, 3, ACCUMULATE>(K, A, lda, B, ldb, C, ldc); break;
        default: micro_kernel<T, MR, 4, ACCUMULATE>(K, A, lda, B, ldb, C, ldc); break;
    }
}

// C = A * B (ACCUMULATE false) or C += A * B (true); N must be a multiple of the lane count.
template <typename T, bool ACCUMULATE>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
          T* C, int64_t ldc) {
    constexpr int W = Simd<T>::lanes;
    for (int64_t n0 = 0; n0 < N; n0 += kMicroVectors * W) {
        const int nv = static_cast<int>(std::min<int64_t>(kMicroVectors, (N - n0) / W));
        const T* b = B + n0;
        for (int64_t m0 = 0; m0 < M; m0 += kMicroRows) {
            const T* a = A + m0 * lda;
            T* c = C + m0 * ldc + n0;
            switch (std::min<int64_t>(kMicroRows, M - m0)) {
                case 1: micro_kernel_nv<T, 1, ACCUMULATE>(nv, K, a, lda, b, ldb, c, ldc); break;
                case 2: micro_kernel_nv<T, 2, ACCUMULATE>(nv, K, a, lda, b, ldb, c, ldc); break;
                case 3: micro_kernel_nv<T, 3, ACCUMULATE>(nv, K, a, lda, b, ldb, c, ldc); break;
                case 4: micro_kernel_nv<T, 4, ACCUMULATE>(nv, K, a, lda, b, ldb, c, ldc); break;
                case 5: micro_kernel_nv<T, 5, ACCUMULATE>(nv, K, a, lda, b, ldb, c, ldc); break;
                default: micro_kernel_nv<T, 6, ACCUMULATE>(nv, K, a, lda, b, ldb, c, ldc); break;
            }
        }
    }
}

}  // namespace psa
