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
//       per CTA: recomputes phi(q_i) and the denominator, takes G_i = g_i H_I^T from a GEMM and
//       c_i = g_i . O_l,i as phi(q_i) . G_i / den_i (the same number: O_l,i = phi(q_i) H_I /
//       den_i, so neither g nor O_l is read here), writes dq = phi'(q)^T ((G_i - c_i Z_I) /
//       den_i) and the tile's dZ_I = -sum_i phi(q_i) c_i / den_i (fixed order, no atomics);
//       c_i itself where asked (row_dot: with g = dO W it is rowsum(dO * O_l W^T), what the
//       sparse backward's delta takes from SLA's merged output).
//   linear_key_grads<In, MAP>   the key side: dk = phi'(k)^T (dPhi_j + dZ_J), dPhi = V dH_J^T
//       from a GEMM.
//   linear_key_tile_grads<In, MAP, HEAD_DIM>   the whole key side of 16-bit inputs (bfloat16
//       operands) in one pass, one key tile of 64 rows per CTA: dv_J = phi(K_J) dH_J and
//       dPhi_J = V_J dH_J^T on tensor cores from one shared copy of dH_J, dv written, dPhi
//       kept in shared memory for the same row stage as linear_key_grads (key_row_grads). It
//       replaces two batched GEMMs (each reading dH_J) and the float32 dPhi round trip.
//   linear_pad_rows   a (B, H, N, D) array copied into a contiguous (B, H, rows, D) buffer
//       whose rows past N are zero (GEMM operands in whole tiles), 16 bytes a thread.
//
// Values travel as raw words (unsigned short for the 16-bit types), as in the forward kernels.
#include "element_types.cuh"
#include "ptx.cuh"
#include "tile_masking.cuh"
#include "tile_traits.cuh"

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
// g_h (= g H_I^T) is contiguous float32 (B, heads, nq * tile, dim); dq is
// contiguous float32 (B, heads, n, dim); dz is float32 (B, heads, nq, dim); row_dot, when not
// null, float32 (B, heads, n).
template <typename In, int MAP>
__global__ void __launch_bounds__(kLinearWarps * 32)
linear_query_grads(const typename Words<In>::Word* __restrict__ q, long long sb, long long sh,
                   long long sn, int heads, int n, int tile, int dim,
                   const float* __restrict__ z, int z_heads, int z_group, int z_per_tile,
                   float eps, const float* __restrict__ g_h, float* __restrict__ dq,
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
        float den = 0.0f, phi_dot_g_h = 0.0f;
        float zv[kMaxChunks], d_phi[kMaxChunks];
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            const bool valid = c < chunks && d < dim;
            zv[c] = valid ? zrow[d] : 0.0f;
            den += phi[c] * zv[c];
            d_phi[c] = valid ? g_h[padded + d] : 0.0f;
            phi_dot_g_h += phi[c] * d_phi[c];  // phi is 0 past dim
        }
        den = warp_sum(den) + eps;
        // O_l,i = 0 where the denominator is exactly 0 (the forward's rule): no gradient there.
        const float inv = den != 0.0f ? 1.0f / den : 0.0f;
        const float c_dot = warp_sum(phi_dot_g_h) * inv;
        if (row_dot != nullptr && lane == 0) row_dot[bh * n + row] = c_dot;
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

// dk of one key row: phi'(k)^T (d_phi + dz) (d_phi in global or shared memory, float32).
template <typename In, int MAP>
__device__ __forceinline__ void key_row_grads(const typename Words<In>::Word* __restrict__ k_row,
                                              const float* d_phi_row, const float* dz_row,
                                              int dim, int lane, float* __restrict__ dk_row) {
    const int chunks = (dim + 31) / 32;
    float input[kMaxChunks], phi[kMaxChunks], d_phi[kMaxChunks];
    feature_row<In, MAP>(k_row, dim, lane, input, phi);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = c * 32 + lane;
        d_phi[c] = (c < chunks && d < dim) ? d_phi_row[d] + dz_row[d] : 0.0f;
    }
    feature_row_vjp<MAP>(input, phi, d_phi);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = c * 32 + lane;
        if (c < chunks && d < dim) dk_row[d] = d_phi[c];
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
    const long long bh = static_cast<long long>(b) * heads + h;
    const float* dzrow = z_row(dz, b, h, t, n_tiles, z_heads, z_group, z_per_tile, dim);
    for (int r = warp; r < tile; r += kLinearWarps) {
        const int row = t * tile + r;
        if (row >= n) break;
        key_row_grads<In, MAP>(k + b * sb + h * sh + row * sn,
                               d_phi_k + (bh * n_tiles * tile + row) * dim, dzrow, dim, lane,
                               dk + (bh * n + row) * dim);
    }
}

// The fused key side's CTA: a tile of 64 keys, four warps of 16 rows (kColumnSplit = 2, eight
// warps each with half the columns, measured the same on an H200: 0.390 against 0.392 ms at
// the Wan shape, and spilled at its 128-register bound). Operands swizzled as the attention
// kernels' (TileTraits::swizzle), so their ldmatrix patterns apply unchanged. Shared memory
// holds dH_J, phi(K_J), V_J in bfloat16,
// then (the same bytes, once the products are done) dPhi in float32 rows of HEAD_DIM + 8: the
// eight rows of one fragment store then sweep the banks four rows at a time (two wavefronts
// for 64 words, the minimum). It is also the loader's traits (load_tile_async).
template <int HEAD_DIM>
struct KeyTileLayout {
    using Tile = TileTraits<HEAD_DIM, 64, 64, 4>;
    static constexpr int kRows = 64;
    static constexpr int kRowGroups = kRows / 16;
    static constexpr int kColumnSplit = 1;
    static constexpr int kWarps = kRowGroups * kColumnSplit;
    static constexpr int kThreads = kWarps * 32;
    // Three CTAs an SM, as many as the shared memory holds: up to 168 registers a thread.
    static constexpr int kMinBlocks = 3;
    static constexpr int kPairs = Tile::kDimBlocks / 2 / kColumnSplit;  // n16 pairs a warp
    static constexpr int kChunksPerRow = Tile::kChunksPerRow;
    static constexpr int kDPhiStride = HEAD_DIM + 8;
    static constexpr int kOperandBytes = 2 * (HEAD_DIM * HEAD_DIM + 2 * kRows * HEAD_DIM);
    static constexpr int kDPhiBytes = 4 * kRows * kDPhiStride;
    static constexpr int kSharedBytes = kOperandBytes > kDPhiBytes ? kOperandBytes : kDPhiBytes;
    template <int ROWS>
    __host__ __device__ static constexpr int tile_offset(int row, int chunk) {
        return Tile::swizzle(row, chunk);
    }
};

// acc = (16 rows of `rows`, from row0) x (columns 16 * first_pair .. + 16 * PAIRS of S, or of
// S^T with TRANSPOSED); `rows` is a (any x HEAD_DIM) and S a (HEAD_DIM x HEAD_DIM) bfloat16
// tile in shared memory, both swizzled by Tile. S^T reads S as Q.K^T reads K (rows of S along
// n); S as P.V reads V (rows along k).
template <class Tile, bool TRANSPOSED, int PAIRS>
__device__ __forceinline__ void rows_times_state(float (&acc)[2 * PAIRS][4],
                                                 const unsigned short* rows, int row0,
                                                 const unsigned short* state, int first_pair,
                                                 int lane) {
#pragma unroll
    for (int nb = 0; nb < 2 * PAIRS; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nb][e] = 0.0f;
    const int matrix = lane >> 3;
#pragma unroll
    for (int ks = 0; ks < Tile::kDimSteps; ++ks) {
        unsigned a[4];
        load_matrix_x4(a, shared_address(rows + Tile::swizzle(row0 + (lane & 15),
                                                              ks * 2 + (lane >> 4))));
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            const int pair = first_pair + p;
            unsigned b[4];
            if (TRANSPOSED) {
                const int row = pair * 16 + (matrix >> 1) * 8 + (lane & 7);
                load_matrix_x4(b, shared_address(state + Tile::swizzle(row, ks * 2 +
                                                                            (matrix & 1))));
            } else {
                const int row = ks * 16 + (matrix & 1) * 8 + (lane & 7);
                load_matrix_x4_transposed(
                    b, shared_address(state + Tile::swizzle(row, pair * 2 + (matrix >> 1))));
            }
            Bf16::mma(acc[2 * p], a, b[0], b[1]);
            Bf16::mma(acc[2 * p + 1], a, b[2], b[3]);
        }
    }
}

// rows_times_state's accumulators as float32 rows of `stride` floats from `rows` (global or
// shared memory): fragment rows fragment_row and fragment_row + 8, columns from 16 * first_pair.
template <int PAIRS>
__device__ __forceinline__ void store_fragments(float* rows, int stride,
                                                const float (&acc)[2 * PAIRS][4],
                                                int fragment_row, int first_pair, int lane) {
#pragma unroll
    for (int nb = 0; nb < 2 * PAIRS; ++nb) {
        const int column = (2 * first_pair + nb) * 8 + 2 * (lane & 3);
#pragma unroll
        for (int half = 0; half < 2; ++half)
            *reinterpret_cast<float2*>(rows + (fragment_row + 8 * half) * stride + column) =
                make_float2(acc[nb][2 * half], acc[nb][2 * half + 1]);
    }
}

// Grid (nk, heads, batch), KeyTileLayout<HEAD_DIM>::kThreads threads, ::kSharedBytes of dynamic shared
// memory. phi_k and v_tiles are the forward's contiguous bfloat16 (B, heads, nk * 64,
// HEAD_DIM) operands (zero rows past n); d_state holds bfloat16 dH_J, one (HEAD_DIM x
// HEAD_DIM) state per (batch, head, key tile), or per (batch, head) when state_per_tile is 0
// (linear="global"); dz as in linear_key_grads; dv is contiguous float32 (B, heads, nk * 64,
// HEAD_DIM) (every row written), dk contiguous float32 (B, heads, n, HEAD_DIM).
template <typename In, int MAP, int HEAD_DIM>
__global__ void __launch_bounds__(KeyTileLayout<HEAD_DIM>::kThreads,
                                   KeyTileLayout<HEAD_DIM>::kMinBlocks)
linear_key_tile_grads(const typename Words<In>::Word* __restrict__ k, long long sb,
                      long long sh, long long sn, int heads, int n,
                      const unsigned short* __restrict__ phi_k,
                      const unsigned short* __restrict__ v_tiles,
                      const unsigned short* __restrict__ d_state, int state_per_tile,
                      const float* __restrict__ dz, int z_heads, int z_group, int z_per_tile,
                      float* __restrict__ dk, float* __restrict__ dv) {
    using Layout = KeyTileLayout<HEAD_DIM>;
    using Tile = typename Layout::Tile;
    constexpr int kRows = Layout::kRows;
    constexpr int kStride = Layout::kDPhiStride;
    constexpr int kPairs = Layout::kPairs;
    extern __shared__ uint4 key_tile_shared[];  // 16-byte words: cp.async and ldmatrix align
    unsigned short* state_tile = reinterpret_cast<unsigned short*>(key_tile_shared);
    unsigned short* phi_tile = state_tile + HEAD_DIM * HEAD_DIM;
    unsigned short* v_tile = phi_tile + kRows * HEAD_DIM;
    float* d_phi = reinterpret_cast<float*>(key_tile_shared);  // once the products are done
    // The host sizes the launch by the same layout (backends/cupy.py): a mismatch must not
    // silently overrun shared memory or leave rows unwritten.
    if (threadIdx.x == 0 &&
        (dynamic_shared_bytes() < Layout::kSharedBytes || blockDim.x != Layout::kThreads))
        __trap();
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int n_tiles = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long bh = static_cast<long long>(b) * heads + h;
    const long long tile_rows = (bh * n_tiles + t) * kRows * HEAD_DIM;
    const long long state = (state_per_tile ? bh * n_tiles + t : bh) * HEAD_DIM * HEAD_DIM;
    load_tile_async<Layout, HEAD_DIM>(state_tile, d_state + state, HEAD_DIM, 0, HEAD_DIM);
    load_tile_async<Layout, kRows>(phi_tile, phi_k + tile_rows, HEAD_DIM, 0, kRows);
    load_tile_async<Layout, kRows>(v_tile, v_tiles + tile_rows, HEAD_DIM, 0, kRows);
    copy_async_commit();
    copy_async_wait<0>();
    __syncthreads();

    const int row0 = 16 * (warp % Layout::kRowGroups);
    const int first_pair = kPairs * (warp / Layout::kRowGroups);
    const int fragment_row = row0 + (lane >> 2);
    float acc[2 * kPairs][4];
    rows_times_state<Tile, false, kPairs>(acc, phi_tile, row0, state_tile, first_pair, lane);
    store_fragments<kPairs>(dv + tile_rows, HEAD_DIM, acc, fragment_row, first_pair, lane);
    rows_times_state<Tile, true, kPairs>(acc, v_tile, row0, state_tile, first_pair, lane);
    __syncthreads();  // every warp is done with the operands: their memory takes dPhi
    store_fragments<kPairs>(d_phi, kStride, acc, fragment_row, first_pair, lane);
    __syncthreads();

    const float* dzrow = z_row(dz, b, h, t, n_tiles, z_heads, z_group, z_per_tile, HEAD_DIM);
    for (int r = warp; r < kRows; r += Layout::kWarps) {
        const int row = t * kRows + r;
        if (row >= n) break;
        key_row_grads<In, MAP>(k + b * sb + h * sh + row * sn, d_phi + r * kStride, dzrow,
                               HEAD_DIM, lane, dk + (bh * n + row) * HEAD_DIM);
    }
}

}  // namespace psa
