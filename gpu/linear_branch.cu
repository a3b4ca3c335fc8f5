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
//   linear_merge<S, O>   out = O_s + Y + b in the output type, one pass; Y = O_l W^T is float32
//       and row-padded to the query tiles.
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
    const float minus_infinity = __int_as_float(0xff800000);  // NVRTC has no INFINITY macro
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int n_tiles = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = (dim + 31) / 32;
    const long long bh = static_cast<long long>(b) * heads + h;
    const float* zrow = nullptr;
    if (QUERY) {
        const long long zt = z_per_tile ? t : 0;
        const long long z_tiles = z_per_tile ? n_tiles : 1;
        zrow = z + ((static_cast<long long>(b) * z_heads + h / z_group) * z_tiles + zt) * dim;
    }
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
        float value[kMaxChunks];
        float top = minus_infinity;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            value[c] = (c < chunks && d < dim) ? Words<In>::load(src[d]) : minus_infinity;
            top = fmaxf(top, value[c]);
        }
        const float row_max = warp_max(top);  // every lane takes part in each shuffle
        float total = 0.0f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = c * 32 + lane;
            const bool valid = c < chunks && d < dim;
            float f;
            if (MAP == kFeatureMapSoftmax) {
                f = valid ? __expf(value[c] - row_max) : 0.0f;
            } else if (MAP == kFeatureMapElu1) {
                f = valid ? (value[c] > 0.0f ? value[c] + 1.0f : __expf(value[c])) : 0.0f;
            } else {
                f = valid ? fmaxf(value[c], 0.0f) : 0.0f;
            }
            value[c] = f;
            total += f;
        }
        if (MAP == kFeatureMapSoftmax) {
            const float inv = 1.0f / warp_sum(total);
#pragma unroll
            for (int c = 0; c < kMaxChunks; ++c) value[c] *= inv;
        }
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

// out[b, h, i, d] = sparse[b, h, i, d] + y[b, h, i, d] + bias[d] over B * heads * n rows;
// sparse and out are contiguous (B, heads, n, dim); y is contiguous (B, heads, n_pad, dim).
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
        float value = Words<S>::load(sparse[i]) + y[padded];
        if (bias != nullptr) value += bias[d];
        out[i] = Words<O>::store(value);
    }
}

}  // namespace psa
