// Strided views of canonical (B, H, N, D) tensors and the tile loads of the kernels.
//
// Layouts are never copied: "bnhd" inputs arrive as transposed views and only their strides
// differ. A kernel reads a tile in place when its element type is the accumulation type, or
// loads it into a small contiguous buffer of the accumulation type, which is where
// float16/bfloat16 are widened (one tile at a time, never a whole tensor).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "dtypes.hpp"
#include "kernels.hpp"

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

template <typename In>
inline Strided<In> strided(const TensorArg& arg) {
    return Strided<In>{static_cast<const In*>(arg.data),
                       {arg.stride[0], arg.stride[1], arg.stride[2], arg.stride[3]}};
}

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

// Transposed load: dst[d * ld + r] = mult * src(row0 + r, d) for r < rows, d < dim.
template <typename In, typename T>
inline void load_rows_transposed(const Strided<In>& src, int64_t b, int64_t h, int64_t row0,
                                 int64_t rows, int64_t dim, T mult, T* dst, int64_t ld) {
    const int64_t sd = src.stride[3];
    for (int64_t r = 0; r < rows; ++r) {
        const In* s = src.row(b, h, row0 + r);
        for (int64_t c = 0; c < dim; ++c) dst[c * ld + r] = mult * widen<T>(s[c * sd]);
    }
}

// Transpose a rows x cols block: dst[c * ld_dst + r] = src[r * ld_src + c].
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst,
                      int64_t ld_dst) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// A rows x dim tile as a gemm operand: element (r, d) is data[r * row + d * col].
template <typename T>
struct TileView {
    const T* data;
    int64_t row, col;
};

// Rows row0.. of x (b, h) as a gemm operand. Read in place when x already holds T: as the A
// operand (broadcast element by element) any strides do; as the B operand (`as_b`, streamed
// as vectors of ld columns) only contiguous rows exactly ld wide. Otherwise the tile is
// widened into buf (row-major, leading dimension ld; columns dim..ld of buf are left as they
// are, zero from allocation).
template <typename In, typename T>
inline TileView<T> tile_view(const Strided<In>& x, int64_t b, int64_t h, int64_t row0,
                             int64_t rows, int64_t dim, bool as_b, T* buf, int64_t ld) {
    if constexpr (std::is_same<In, T>::value) {
        if (!as_b || (x.stride[3] == 1 && dim == ld))
            return TileView<T>{x.row(b, h, row0), x.stride[2], x.stride[3]};
    }
    load_rows(x, b, h, row0, rows, dim, T(1), buf, ld);
    return TileView<T>{buf, ld, 1};
}

inline int64_t tile_count(int64_t n, int64_t block) { return (n + block - 1) / block; }

}  // namespace psa
