// One step of the online softmax: fold a tile of scaled logits into the running row state.
//
// Two forms of the same step: the row form works on S = Q K^T (one row per query; used by the
// backward), the column form on S^T (one column per query; used by the forward, where it
// turns every per-query statistic into a vector operation).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.hpp"

namespace psa {

// For each of `rows` rows: m <- max(m, tile_max); rescale l, u (when given) and the output
// accumulator o by exp(m_old - m_new); replace the logits s (keys_pad columns, padded keys at
// -inf) by P = exp(s - m_new) and add its row sum to l. The caller then adds P.V to o.
template <typename T>
inline void online_softmax_update(int64_t rows, T* s, int64_t ld_s, int64_t keys_pad,
                                  const T* tile_max, T* m, T* l, T* u, T* o, int64_t ld_o) {
    for (int64_t i = 0; i < rows; ++i) {
        const T m_new = std::max(m[i], tile_max[i]);
        const T alpha = std::exp(m[i] - m_new);  // 0 on the first tile, where m = -inf
        const T row_sum = exp_shift_sum(s + i * ld_s, m_new, keys_pad);
        l[i] = l[i] * alpha + row_sum;
        if (u) u[i] *= alpha;
        m[i] = m_new;
        if (alpha != T(1)) {
            T* oi = o + i * ld_o;
            for (int64_t d = 0; d < ld_o; ++d) oi[d] *= alpha;
        }
    }
}

// Mask the padded keys of each row (columns keys..keys_pad) with -inf and return row maxima.
template <typename T>
inline void mask_and_row_max(int64_t rows, T* s, int64_t ld_s, int64_t keys, int64_t keys_pad,
                             T* tile_max) {
    for (int64_t i = 0; i < rows; ++i) {
        T* si = s + i * ld_s;
        for (int64_t j = keys; j < keys_pad; ++j) si[j] = -INFINITY;
        Vec<T> best = load_vec(si);
        for (int64_t j = Simd<T>::lanes; j < keys_pad; j += Simd<T>::lanes)
            best = max_vec<T>(best, load_vec(si + j));
        T top = best[0];
        for (int w = 1; w < Simd<T>::lanes; ++w) top = best[w] > top ? best[w] : top;
        tile_max[i] = top;
    }
}

// ---- Transposed ("column") form: st is keys x cols, one column per query row. ----
// Every per-row statistic is then a vector across the columns: maxima, sums and rescales are
// element-wise vector operations, with no horizontal reduction in the inner loop.

// out[c] = max over key rows j < keys of st[j * ld + c], for c < cols (a multiple of lanes).
template <typename T>
inline void column_max(int64_t keys, const T* st, int64_t ld, int64_t cols, T* out) {
    constexpr int W = Simd<T>::lanes;
    for (int64_t c = 0; c < cols; c += W) {
        Vec<T> best = load_vec(st + c);
        for (int64_t j = 1; j < keys; ++j) best = max_vec<T>(best, load_vec(st + j * ld + c));
        store_vec(out + c, best);
    }
}

// out[c] = sum over key rows of exp(st[j * ld + c] - m[c]) (Recall exact's skip test).
template <typename T>
inline void column_exp_sums(int64_t keys, const T* st, int64_t ld, int64_t cols, const T* m,
                            T* out) {
    constexpr int W = Simd<T>::lanes;
    for (int64_t c = 0; c < cols; c += W) {
        const Vec<T> shift = load_vec(m + c);
        Vec<T> sum{};
        for (int64_t j = 0; j < keys; ++j) sum += exp_vec(load_vec(st + j * ld + c) - shift);
        store_vec(out + c, sum);
    }
}

// The online-softmax step in column form: m <- max(m, tile_max), alpha = exp(m_old - m_new)
// (0 where m_old = -inf), st <- exp(st - m_new), l <- l * alpha + column sums, u <- u * alpha.
// alpha is returned per column so that the caller rescales its output rows.
template <typename T>
inline void online_softmax_update_columns(int64_t keys, T* st, int64_t ld, int64_t cols,
                                          const T* tile_max, T* m, T* l, T* u, T* alpha) {
    constexpr int W = Simd<T>::lanes;
    for (int64_t c = 0; c < cols; c += W) {
        const Vec<T> m_old = load_vec(m + c);
        const Vec<T> m_new = max_vec<T>(m_old, load_vec(tile_max + c));
        const Vec<T> scale = exp_vec(m_old - m_new);
        Vec<T> sum{};
        for (int64_t j = 0; j < keys; ++j) {
            const Vec<T> p = exp_vec(load_vec(st + j * ld + c) - m_new);
            store_vec(st + j * ld + c, p);
            sum += p;
        }
        store_vec(m + c, m_new);
        store_vec(l + c, load_vec(l + c) * scale + sum);
        store_vec(u + c, load_vec(u + c) * scale);
        store_vec(alpha + c, scale);
    }
}

}  // namespace psa
