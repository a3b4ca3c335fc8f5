// Strided views of canonical (B, H, N, D) tensors and the tile loads of the kernels.
//
// Layouts are never copied: "bnhd" inputs arrive as transposed views and only their strides
// differ. A kernel loads one tile at a time into a small contiguous buffer of the accumulation
// type, which is also where float16/bfloat16 are widened.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dtypes.hpp"

namespace psa {

// A read-only 4-d tensor of element type In; strides are in elements and may be negative.
template <typename In>
struct Strided {
    const In* data;
    int64_t stride[4];

    const In* row(int64_t b, int64_t h, int64_t n) const {
        return data + b * stride[0] + h * stride[1] + n * stride[2];
    }
};

// dst[r * ld + d] = mult * src(row0 + r, d) for r < rows, d < dim.
template <typename In, typename T>
inline void load_rows(const Strided<In>& src, int64_t b, int64_t h, int64_t row0, int64_t rows,
                      int64_t dim, T mult, T* dst, int64_t ld) {
    const int64_t sd = src.stride[3];
    for (int64_t r = 0; r < rows; ++r) {
        const In* s = src.row(b, h, row0 + r);
        T* d = dst + r * ld;
        if (sd == 1) {
            for (int64_t c = 0; c < dim; ++c) d[c] = mult * widen<T>(s[c]);
        } else {
            for (int64_t c = 0; c < dim; ++c) d[c] = mult * widen<T>(s[c * sd]);
        }
    }
}

// Transposed load: dst[d * ld + r] = src(row0 + r, d) for r < rows, d < dim.
template <typename In, typename T>
inline void load_rows_transposed(const Strided<In>& src, int64_t b, int64_t h, int64_t row0,
                                 int64_t rows, int64_t dim, T* dst, int64_t ld) {
    const int64_t sd = src.stride[3];
    for (int64_t r = 0; r < rows; ++r) {
        const In* s = src.row(b, h, row0 + r);
        for (int64_t c = 0; c < dim; ++c) dst[c * ld + r] = widen<T>(s[c * sd]);
    }
}

// A writable contiguous (B, H, N, D) output of element type Out.
template <typename Out>
struct Dense4 {
    Out* data;
    int64_t heads, rows, dim;

    Out* row(int64_t b, int64_t h, int64_t n) const {
        return data + ((b * heads + h) * rows + n) * dim;
    }
};

inline int64_t tile_count(int64_t n, int64_t block) { return (n + block - 1) / block; }

}  // namespace psa
