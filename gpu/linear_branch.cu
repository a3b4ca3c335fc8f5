// The elementwise stages of the SLA linear branch on the GPU (the GEMMs between them are cuBLAS
// calls made by pysparse_attn/backends/cupy.py):
//
//   linear_features<In, Out, MAP, QUERY>   phi of one tile of rows per CTA, written as the GEMM
//       operand type Out into a contiguous, zero-padded (B, H, n_tiles * tile, D) buffer.
//       Key tiles (QUERY = false) also write Z_J = phi(K_J)^T 1 of the rounded values (so that
//       the denominator sums exactly what the numerator's GEMM multiplies). Query tiles
//       (QUERY = true) are divided by their denominator phi(q_i) . Z_I + eps, computed here in
//       float32 from the float32 phi, so that the final GEMM yields O_l itself; a row whose
//       denominator is exactly zero is written as zeros (O_l = 0 there, as the contract says).
//   linear_merge<S, O>   out = O_s + Y + b in the output type, one pass; Y = O_l W^T is
//       float32 and row-padded to the query tiles. (The backward never undoes it: the sparse
//       backward takes delta from the merged output, see MergedOutput in backends/cupy.py.)
//   linear_query_grads<In, MAP>   the backward's per-row stage on the query side, one query tile
//       per CTA: recomputes phi(q_i) and the denominator, takes c_i = g_i . O_l,i from the
//       float32 rows, writes dq = phi'(q)^T ((G_i - c_i Z_I) / den_i) with G_i = g_i H_I^T from
//       a GEMM, and the tile's dZ_I = -sum_i phi(q_i) c_i / den_i (fixed order, no atomics);
//       c_i itself where asked (row_dot: with g = dO W it is rowsum(dO * O_l W^T), what the
//       sparse backward's delta takes from SLA's merged output).
//   linear_key_grads<In, MAP>   the key side: dk = phi'(k)^T (dPhi_j + dZ_J), dPhi = V dH_J^T
//       from a GEMM.
//   linear_pad_rows   a (B, H, N, D) array copied into a contiguous (B, H, rows, D) buffer
//       whose rows past N are zero (GEMM operands in whole tiles), 16 bytes a thread.
//
// Values travel as raw words (unsigned short for the 16-bit types), as in the forward kernels.
#include "element_types.cuh"

namespace psa {

struct F32 {
    __device__ static __forceinline__ float to_float(float value) { return value; }
};

template <typename E>
struct Words {  // 16-bit element types of element_types.cuh
    using Word = unsigned short;
    __device__ static __forceinline__ float load(Word bits) { return E::to_float(bits); }
    __device__ static __forceinline__ Word store(float value) {
        return static_cast<Word>(E::pack(value, 0.0f) & 0xffffu);
    }
};

template <>
struct Words<F32> {
    using Word = float;
    __device__ static __forceinline__ float load(Word value) { return value; }
    __device__ static __forceinline__ Word store(float value) { return value; }
};

constexpr int kFeatureMapSoftmax = 0;
constexpr int kFeatureMapElu1 = 1;
constexpr int kFeatureMapRelu = 2;

constexpr int kLinearWarps = 8;
constexpr int kMaxChunks = 8;  // head dims up to 8 * 32 = 256, one value per lane per chunk

__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ float warp_max(float value) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// phi of one row, one value per lane and chunk of 32 along D: x holds the inputs (minus
// infinity past dim), f the features (0 past dim). The one definition of the maps on the GPU.
template <typename In, int MAP>
__device__ __forceinline__ void feature_row(const typename Words<In>::Word* __restrict__ src,
                                            int dim, int lane, float (&x)[kMaxChunks],
                                            float (&f)[kMaxChunks]) {
    const float minus_infinity = __int_as_float(0xff800000);  // NVRTC has no INFINITY macro
    const int chunks = (dim + 31) / 32;
    float top = minus_infinity;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = c * 32 + lane;
        x[c] = (c < chunks && d < dim) ? Words<In>::load(src[d]) : minus_infinity;
        top = fmaxf(top, x[c]);
    }
    const float row_max = warp_max(top);  // every lane takes part in each shuffle
    float total = 0.0f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = c * 32 + lane;
        const bool valid = c < chunks && d < dim;
        float value;
        if (MAP == kFeatureMapSoftmax) {
            value = valid ? __expf(x[c] - row_max) : 0.0f;
        } else if (MAP == kFeatureMapElu1) {
            value = valid ? (x[c] > 0.0f ? x[c] + 1.0f : __expf(x[c])) : 0.0f;
        } else {
            value = valid ? fmaxf(x[c], 0.0f) : 0.0f;
        }
        f[c] = value;
        total += value;
    }
    if (MAP == kFeatureMapSoftmax) {
        const float inv = 1.0f / warp_sum(total);
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) f[c] *= inv;
    }
}

// (d phi / d x)^T d_phi of one row, in place in d_phi (relu's derivative at 0 is 0).
template <int MAP>
__device__ __forceinline__ void feature_row_vjp(const float (&x)[kMaxChunks],
                                                const float (&f)[kMaxChunks],
                                                float (&d_phi)[kMaxChunks]) {
    if (MAP == kFeatureMapSoftmax) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) dot += d_phi[c] * f[c];  // f is 0 past dim
        dot = warp_sum(dot);
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) d_phi[c] = f[c] * (d_phi[c] - dot);
    } else {
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c)
            d_phi[c] = x[c] > 0.0f ? d_phi[c] : (MAP == kFeatureMapElu1 ? d_phi[c] * f[c] : 0.0f);
    }
}

// Where a row's Z lives: z + ((b * z_heads + h / z_group) * z_tiles + (z_per_tile ? t : 0)) * dim.
__device__ __forceinline__ const float* z_row(const float* z, int b, int h, int t, int n_tiles,
                                              int z_heads, int z_group, int z_per_tile, int dim) {
    const long long tiles = z_per_tile ? n_tiles : 1;
    const long long tile = z_per_tile ? t : 0;
    return z + ((static_cast<long long>(b) * z_heads + h / z_group) * tiles + tile) * dim;
}

// Grid (n_tiles, heads, batch), 256 threads; warp w handles rows w, w + 8, ... of the tile.
// x has element strides (sb, sh, sn) and unit stride along D. z (QUERY only) holds Z per
// (batch, z head, z tile): query head h reads z head h / z_group and tile I (or 0 when
// z_per_tile is 0, the one state of linear="global").
template <typename In, typename Out, int MAP, bool QUERY>
__global__ void __launch_bounds__(kLinearWarps * 32)
linear_features(const typename Words<In>::Word* __restrict__ x, long long sb, long long sh,
                long long sn, int heads, int n, int tile, int dim,
                typename Words<Out>::Word* __restrict__ phi, float* __restrict__ tile_sums,
                const float* __restrict__ z, int z_heads, int z_group, int z_per_tile,
                float eps) {
    __shared__ float partial[kLinearWarps][kMaxChunks * 32];
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int n_tiles = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = (dim + 31) / 32;
    const long long bh = static_cast<long long>(b) * heads + h;
    const float* zrow =
        QUERY ? z_row(z, b, h, t, n_tiles, z_heads, z_group, z_per_tile, dim) : nullptr;
    float sums[kMaxChunks];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) sums[c] = 0.0f;

    for (int r = warp; r < tile; r += kLinearWarps) {
        const int row = t * tile + r;
        typename Words<Out>::Word* dst = phi + (bh * n_tiles * tile + row) * dim;
        if (row >= n) {  // padding rows of the last tile: exact zeros for the GEMMs
            for (int c = 0; c < chunks; ++c) {
                const int d = c * 32 + lane;
                if (d < dim) dst[d] = Words<Out>::store(0.0f);
            }
            continue;
        }
        const typename Words<In>::Word* src = x + b * sb + h * sh + row * sn;
        float input[kMaxChunks], value[kMaxChunks];
        feature_row<In, MAP>(src, dim, lane, input, value);
        float scale = 1.0f;
        if (QUERY) {
            float dot = 0.0f;
#pragma unroll
            for (int c = 0; c < kMaxChunks; ++c) {
                const int d = c * 32 + lane;
                if (c < chunks && d < dim) dot += value[c] * zrow[d];
            }
            const float den = warp_sum(dot) + eps;
            scale = den != 0.0f ? 1.0f / den : 0.0f;
        }
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            if (c < chunks && d < dim) {
                const typename Words<Out>::Word word = Words<Out>::store(value[c] * scale);
                dst[d] = word;
                if (!QUERY) sums[c] += Words<Out>::load(word);
            }
        }
    }
    if (!QUERY) {
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) partial[warp][c * 32 + lane] = sums[c];
        __syncthreads();
        for (int d = threadIdx.x; d < dim; d += blockDim.x) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < kLinearWarps; ++w) total += partial[w][d];
            tile_sums[(bh * n_tiles + t) * dim + d] = total;
        }
    }
}

// out[b, h, i, d] = sparse[b, h, i, d] + y[b, h, i, d] + bias[d] over B * heads * n
// rows; sparse and out are contiguous (B, heads, n, dim); y is contiguous (B, heads, n_pad, dim).
template <typename S, typename O>
__global__ void linear_merge(const typename Words<S>::Word* __restrict__ sparse,
                             const float* __restrict__ y, const float* __restrict__ bias,
                             int n, int n_pad, int dim, long long total,
                             typename Words<O>::Word* __restrict__ out) {
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         i < total; i += step) {
        const long long row = i / dim;
        const int d = static_cast<int>(i - row * dim);
        const long long bh = row / n;
        const long long padded = (bh * n_pad + (row - bh * n)) * dim + d;
        float added = y[padded];
        if (bias != nullptr) added += bias[d];
        const float value = Words<S>::load(sparse[i]) + added;
        out[i] = Words<O>::store(value);
    }
}

// padded[s, r, :] = source[s, r, :] for r < n, 0 for n <= r < rows, over the (b, h) slabs s;
// a row is `row_vectors` 16-byte vectors, source slabs `slab_vectors` vectors apart (rows
// contiguous, 16-byte aligned: the host checks). One pass writes every byte of `padded`.
__global__ void linear_pad_rows(const uint4* __restrict__ source, long long slab_vectors,
                                int n, int rows, int row_vectors, long long total,
                                uint4* __restrict__ padded) {
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         i < total; i += step) {
        const long long row = i / row_vectors;  // over every slab's padded rows
        const int column = static_cast<int>(i - row * row_vectors);
        const long long slab = row / rows;
        const int in_slab = static_cast<int>(row - slab * rows);
        padded[i] = in_slab < n ? source[slab * slab_vectors +
                                         static_cast<long long>(in_slab) * row_vectors + column]
                                : make_uint4(0u, 0u, 0u, 0u);
    }
}

// Grid (nq, heads, batch), 256 threads, a warp a row. q has element strides (sb, sh, sn);
// g, o_linear and g_h (= g H_I^T) are contiguous float32 (B, heads, nq * tile, dim); dq is
// contiguous float32 (B, heads, n, dim); dz is float32 (B, heads, nq, dim); row_dot, when not
// null, float32 (B, heads, n).
template <typename In, int MAP>
__global__ void __launch_bounds__(kLinearWarps * 32)
linear_query_grads(const typename Words<In>::Word* __restrict__ q, long long sb, long long sh,
                   long long sn, int heads, int n, int tile, int dim,
                   const float* __restrict__ z, int z_heads, int z_group, int z_per_tile,
                   float eps, const float* __restrict__ g, const float* __restrict__ o_linear,
                   const float* __restrict__ g_h, float* __restrict__ dq,
                   float* __restrict__ dz, float* __restrict__ row_dot) {
    __shared__ float partial[kLinearWarps][kMaxChunks * 32];
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int n_tiles = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = (dim + 31) / 32;
    const long long bh = static_cast<long long>(b) * heads + h;
    const float* zrow = z_row(z, b, h, t, n_tiles, z_heads, z_group, z_per_tile, dim);
    float sums[kMaxChunks];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) sums[c] = 0.0f;

    for (int r = warp; r < tile; r += kLinearWarps) {
        const int row = t * tile + r;
        if (row >= n) break;  // rows only grow with r: the rest of the tile is padding
        float input[kMaxChunks], phi[kMaxChunks];
        feature_row<In, MAP>(q + b * sb + h * sh + row * sn, dim, lane, input, phi);
        const long long padded = (bh * n_tiles * tile + row) * dim;
        float den = 0.0f, c_dot = 0.0f;
        float zv[kMaxChunks], d_phi[kMaxChunks];
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            const bool valid = c < chunks && d < dim;
            zv[c] = valid ? zrow[d] : 0.0f;
            den += phi[c] * zv[c];
            c_dot += valid ? g[padded + d] * o_linear[padded + d] : 0.0f;
            d_phi[c] = valid ? g_h[padded + d] : 0.0f;
        }
        den = warp_sum(den) + eps;
        c_dot = warp_sum(c_dot);
        if (row_dot != nullptr && lane == 0) row_dot[bh * n + row] = c_dot;
        // O_l,i = 0 where the denominator is exactly 0 (the forward's rule): no gradient there.
        const float inv = den != 0.0f ? 1.0f / den : 0.0f;
        const float d_den = -c_dot * inv;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            d_phi[c] = d_phi[c] * inv + d_den * zv[c];
            sums[c] += phi[c] * d_den;
        }
        feature_row_vjp<MAP>(input, phi, d_phi);
        float* dst = dq + (bh * n + row) * dim;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            if (c < chunks && d < dim) dst[d] = d_phi[c];
        }
    }
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) partial[warp][c * 32 + lane] = sums[c];
    __syncthreads();
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < kLinearWarps; ++w) total += partial[w][d];
        dz[(bh * n_tiles + t) * dim + d] = total;
    }
}

// Grid (nk, heads, batch), 256 threads, a warp a row. k has element strides (sb, sh, sn);
// d_phi (= V dH_J^T) is contiguous float32 (B, heads, nk * tile, dim); dz is read like Z in
// linear_query_grads; dk is contiguous float32 (B, heads, n, dim).
template <typename In, int MAP>
__global__ void __launch_bounds__(kLinearWarps * 32)
linear_key_grads(const typename Words<In>::Word* __restrict__ k, long long sb, long long sh,
                 long long sn, int heads, int n, int tile, int dim,
                 const float* __restrict__ d_phi_k, const float* __restrict__ dz,
                 int z_heads, int z_group, int z_per_tile, float* __restrict__ dk) {
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int n_tiles = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = (dim + 31) / 32;
    const long long bh = static_cast<long long>(b) * heads + h;
    const float* dzrow = z_row(dz, b, h, t, n_tiles, z_heads, z_group, z_per_tile, dim);
    for (int r = warp; r < tile; r += kLinearWarps) {
        const int row = t * tile + r;
        if (row >= n) break;
        float input[kMaxChunks], phi[kMaxChunks], d_phi[kMaxChunks];
        feature_row<In, MAP>(k + b * sb + h * sh + row * sn, dim, lane, input, phi);
        const long long padded = (bh * n_tiles * tile + row) * dim;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            d_phi[c] = (c < chunks && d < dim) ? d_phi_k[padded + d] + dzrow[d] : 0.0f;
        }
        feature_row_vjp<MAP>(input, phi, d_phi);
        float* dst = dk + (bh * n + row) * dim;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            if (c < chunks && d < dim) dst[d] = d_phi[c];
        }
    }
}

}  // namespace psa
