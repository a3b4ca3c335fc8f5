// Attention backward on mma.sync (FlashAttention-2 style), docs/design.rst section 7: the gradients of
// attention restricted to a fixed kept-tile set, which the forward's plan lists.
//
// Six kernels, queued on one stream with no host read between them:
//   attention_backward_list_counts the kept bitmap's list lengths, both directions;
//   attention_backward_lists       then its CSR lists, query-major (the forward's plan) and
//                                  key-major (what the dK/dV pass walks).
//   attention_backward_preprocess  per row: delta = rowsum(dO * O) (from SLA's merged output
//                                  and its linear terms where given), the LSE in log2 units
//                                  (+inf where P is exactly 0), and the dQ accumulator started
//                                  at zero (at dq_addend when another branch's dQ is given).
//   attention_backward_dkdv        one CTA per (key tile, kv head, batch), K and V resident in
//                                  shared memory, dK and dV in fp32 registers (warp w owns keys
//                                  16w..16w+15). It walks the key-major list of the query tiles
//                                  that kept its tile, for every query head of the GQA group (so
//                                  dK/dV need no atomics), in 64-row steps with Q, dO and the
//                                  row statistics double-buffered by cp.async. Per step, in the
//                                  transposed frame (keys as rows):
//                                    S^T = K Q^T, P^T = exp2(S^T scale_log2 - lse_log2),
//                                    dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//                                    dK += dS^T Q,
//                                  and with ACCUMULATE_DQ, dS^T goes to shared memory and each
//                                  warp adds its 16 rows of scale * dS K to the fp32 dQ
//                                  accumulator (atomic reductions; order-dependent rounding).
//   attention_backward_dq          deterministic dQ: one CTA per 64 query rows walks the row's
//                                  query-major list (the forward's plan row) with K and V
//                                  double-buffered, recomputes P and dS and accumulates dQ in
//                                  registers: bitwise reproducible.
//   attention_backward_dq_from_tiles  the wgmma families' tiled dQ accumulator (bulk-reduced,
//                                  DqTileLayout) to dq in the gradient dtype, plus dq_addend.
// A key tile nobody kept gets a CTA with an empty walk, which writes exact zeros (the addend's
// values, where one is given: every gradient store adds it, see store_fragment_rows). Padded keys
// are masked (P = 0) and padded rows have lse_log2 = +inf (P = 0) and zero-filled dO, so
// partial tiles contribute exactly nothing.
//
// Template instances are listed by pysparse_attn/backends/cupy.py (BACKWARD_INSTANCES) and
// compiled by pysparse_attn/backends/compile_check.py.

#include "backward_params.cuh"
#include "backward_tiles.cuh"
#include "element_types.cuh"
#include "ptx.cuh"
#include "tile_masking.cuh"
#include "tile_traits.cuh"

namespace psa {

// The kept bitmap as CSR lists, both directions: blockIdx.y = 0 lists each query tile's kept
// key tiles, 1 each key tile's query tiles, both ascending. Grid (B * H, 2, list chunks of
// kListsPerCta), a warp per list, its lanes over 32 targets at a time (one ballot each): the
// bitmap is read coalesced along a row and from L2 along a column, the indices written
// coalesced. Two passes, because a list's place depends on every list before it:
// attention_backward_list_counts writes each list's length, attention_backward_lists scans
// them (every CTA of a (b * H + h, direction) the same way, in shared memory: one int a list
// plus one) and writes offsets and indices. The index arrays arrive filled with -1 (the Plan
// contract past the end). One CTA per (b * H + h, direction) walking whole lists a thread
// took 0.18 ms at nq = 256, nk = 512, H = 12 on an H200 (24 CTAs, latency-bound); these two
// passes 0.09 ms (bench/lists_timing.py, 2026-12-04).
constexpr int kListThreads = 256;
constexpr int kListsPerWarp = 4;
constexpr int kListsPerCta = kListThreads / 32 * kListsPerWarp;

// One direction of one (b, h) slab of the kept bitmap, read a warp-wide chunk at a time.
struct KeptListsView {
    const unsigned char* bitmap;
    int n_lists, n_targets;
    long long list_stride, target_stride;

    __device__ KeptListsView(const unsigned char* kept, int n_query_tiles, int n_key_tiles,
                             bool by_key, long long slab)
        : bitmap(kept + slab * n_query_tiles * n_key_tiles),
          n_lists(by_key ? n_key_tiles : n_query_tiles),
          n_targets(by_key ? n_query_tiles : n_key_tiles),
          list_stride(by_key ? 1 : n_key_tiles),
          target_stride(by_key ? n_key_tiles : 1) {}

    // Bit l: target 32 chunk + l is in `list`. Called by the whole warp.
    __device__ __forceinline__ unsigned ballot(int list, int chunk, int lane) const {
        const int target = chunk * 32 + lane;
        const bool kept = target < n_targets &&
                          bitmap[list * list_stride + target * target_stride] != 0;
        return __ballot_sync(0xffffffffu, kept);
    }
};

// counts: (B * H, nq + nk) ints, the query tiles' lists first.
__global__ void __launch_bounds__(kListThreads)
    attention_backward_list_counts(const unsigned char* __restrict__ kept, int n_query_tiles,
                                   int n_key_tiles, int* __restrict__ counts) {
    const bool by_key = blockIdx.y == 1;
    const KeptListsView view(kept, n_query_tiles, n_key_tiles, by_key, blockIdx.x);
    int* slab_counts = counts + (long long)blockIdx.x * (n_query_tiles + n_key_tiles) +
                       (by_key ? n_query_tiles : 0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int j = 0; j < kListsPerWarp; ++j) {
        const int list = blockIdx.z * kListsPerCta + warp * kListsPerWarp + j;
        if (list >= view.n_lists) break;  // warp-uniform
        int count = 0;
        for (int chunk = 0; chunk * 32 < view.n_targets; ++chunk)
            count += __popc(view.ballot(list, chunk, lane));
        if (lane == 0) slab_counts[list] = count;
    }
}

__global__ void __launch_bounds__(kListThreads)
    attention_backward_lists(const unsigned char* __restrict__ kept, int n_query_tiles,
                             int n_key_tiles, const int* __restrict__ counts,
                             int* __restrict__ row_offsets, int* __restrict__ row_indices,
                             int* __restrict__ col_offsets, int* __restrict__ col_indices) {
    extern __shared__ int list_offsets[];
    const bool by_key = blockIdx.y == 1;
    const KeptListsView view(kept, n_query_tiles, n_key_tiles, by_key, blockIdx.x);
    const int n_lists = view.n_lists;
    if (blockIdx.z * kListsPerCta >= n_lists) return;  // the whole CTA, before any barrier
    const int* slab_counts = counts + (long long)blockIdx.x * (n_query_tiles + n_key_tiles) +
                             (by_key ? n_query_tiles : 0);
    const long long capacity = (long long)n_query_tiles * n_key_tiles;
    int* offsets = (by_key ? col_offsets : row_offsets) + (long long)blockIdx.x * (n_lists + 1);
    int* indices = (by_key ? col_indices : row_indices) + blockIdx.x * capacity;

    for (int list = threadIdx.x; list < n_lists; list += blockDim.x)
        list_offsets[list + 1] = slab_counts[list];
    __syncthreads();
    if (threadIdx.x < 32) {
        // Inclusive scan of counts 1..n_lists: each lane sums a contiguous chunk, a shuffle
        // scan offsets the chunks, then each lane rewrites its chunk.
        const int lane = threadIdx.x;
        const int chunk = (n_lists + 31) / 32;
        const int begin = 1 + lane * chunk, end = min(n_lists + 1, begin + chunk);
        int sum = 0;
        for (int i = begin; i < end; ++i) sum += list_offsets[i];
        int prefix = sum;
#pragma unroll
        for (int width = 1; width < 32; width *= 2) {
            const int other = __shfl_up_sync(0xffffffffu, prefix, width);
            if (lane >= width) prefix += other;
        }
        int running = prefix - sum;
        for (int i = begin; i < end; ++i) {
            running += list_offsets[i];
            list_offsets[i] = running;
        }
        if (lane == 0) list_offsets[0] = 0;
    }
    __syncthreads();
    if (blockIdx.z == 0)
        for (int i = threadIdx.x; i <= n_lists; i += blockDim.x) offsets[i] = list_offsets[i];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned below = (1u << lane) - 1u;  // the lanes before this one
    for (int j = 0; j < kListsPerWarp; ++j) {
        const int list = blockIdx.z * kListsPerCta + warp * kListsPerWarp + j;
        if (list >= n_lists) break;  // warp-uniform
        int position = list_offsets[list];
        for (int chunk = 0; chunk * 32 < view.n_targets; ++chunk) {
            const unsigned mask = view.ballot(list, chunk, lane);
            if ((mask >> lane) & 1u) indices[position + __popc(mask & below)] = chunk * 32 + lane;
            position += __popc(mask);
        }
    }
}

// grid (n_rows_padded / rows a CTA, Hq, B), 128 threads; HEAD_DIM / 8 threads a row, each
// reading 8 dims of dO and O.
template <class Element, int HEAD_DIM>
__global__ void __launch_bounds__(128)
    attention_backward_preprocess(const __grid_constant__ BackwardParams params) {
    constexpr int kChunks = HEAD_DIM / 8;
    constexpr int kRows = 128 / kChunks;
    const int row = blockIdx.x * kRows + threadIdx.x / kChunks;
    const int chunk = threadIdx.x % kChunks;
    const int head = blockIdx.y, batch = blockIdx.z;
    const long long slab = (long long)batch * params.n_heads + head;
    const bool valid = row < params.n_queries;
    float sum = 0.f;
    if (valid) {
        const uint4 d_out = *reinterpret_cast<const uint4*>(
            params.d_out + batch * params.d_out_batch_stride + head * params.d_out_head_stride +
            row * params.d_out_row_stride + chunk * 8);
        const unsigned d_words[4] = {d_out.x, d_out.y, d_out.z, d_out.w};
        const long long out_offset = batch * params.out_batch_stride +
                                     head * params.out_head_stride +
                                     row * params.out_row_stride + chunk * 8;
        float out[8];
        if (params.out_float32) {
            const float4* source =
                reinterpret_cast<const float4*>(static_cast<const float*>(params.out) + out_offset);
            const float4 lo = source[0], hi = source[1];
            out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
            out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
        } else {
            const uint4 packed = *reinterpret_cast<const uint4*>(
                static_cast<const unsigned short*>(params.out) + out_offset);
            const unsigned words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                out[2 * w] = Element::to_float(static_cast<unsigned short>(words[w] & 0xffffu));
                out[2 * w + 1] = Element::to_float(static_cast<unsigned short>(words[w] >> 16));
            }
        }
        if (params.out_bias != nullptr) {
            const float4* bias = reinterpret_cast<const float4*>(params.out_bias + chunk * 8);
            const float4 lo = bias[0], hi = bias[1];
            out[0] -= lo.x; out[1] -= lo.y; out[2] -= lo.z; out[3] -= lo.w;
            out[4] -= hi.x; out[5] -= hi.y; out[6] -= hi.z; out[7] -= hi.w;
        }
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            sum += Element::to_float(static_cast<unsigned short>(d_words[w] & 0xffffu)) * out[2 * w];
            sum += Element::to_float(static_cast<unsigned short>(d_words[w] >> 16)) * out[2 * w + 1];
        }
    }
#pragma unroll
    for (int width = 1; width < kChunks; width *= 2)
        sum += __shfl_xor_sync(0xffffffffu, sum, width);
    if (valid && params.delta_shift != nullptr)
        sum -= params.delta_shift[slab * params.n_queries + row];
    if (chunk == 0) {
        const long long flat = slab * params.n_rows_padded + row;
        const float lse = valid ? params.lse[slab * params.n_queries + row] : 0.f;
        // `lse > -inf` is false for -inf (no kept tile) and NaN: P is then exactly 0.
        params.lse_log2[flat] = valid && lse > negative_infinity()
                                    ? lse * 1.4426950408889634f
                                    : __int_as_float(0x7f800000);
        params.delta[flat] = valid ? sum : 0.f;
    }
    if (params.dq_accumulator != nullptr && params.dq_tiles) {
        // Every row of every step (the tiles' padded rows are reduced into too); the addend
        // joins in attention_backward_dq_from_tiles. Zero is zero in any layout.
        float4* accumulator = reinterpret_cast<float4*>(
            params.dq_accumulator + (slab * params.n_rows_padded + row) * HEAD_DIM + chunk * 8);
        accumulator[0] = accumulator[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else if (params.dq_accumulator != nullptr && valid) {
        float4* accumulator = reinterpret_cast<float4*>(
            params.dq_accumulator + (slab * params.n_queries + row) * HEAD_DIM + chunk * 8);
        float4 start[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
        if (params.dq_addend != nullptr) {
            const float4* addend = reinterpret_cast<const float4*>(
                params.dq_addend + slab * params.dq_addend_slab + (long long)row * HEAD_DIM +
                chunk * 8);
            start[0] = addend[0];
            start[1] = addend[1];
        }
        accumulator[0] = start[0];
        accumulator[1] = start[1];
    }
}

// dq from the wgmma families' tiled accumulator (DqTileLayout): one CTA of 128 threads per
// (64-row step, head, batch), thread t reading its own fragments (coalesced float4s) and
// writing them in the gradient dtype, C-contiguous (B, Hq, Nq, D), plus dq_addend, rounded once.
template <class Element, int HEAD_DIM>
__global__ void __launch_bounds__(128)
    attention_backward_dq_from_tiles(const __grid_constant__ BackwardParams params) {
    const int thread = threadIdx.x, head = blockIdx.y, batch = blockIdx.z;
    const int first_row = blockIdx.x * 64;
    const long long slab = (long long)batch * params.n_heads + head;
    const float* tile =
        params.dq_accumulator + (slab * params.n_rows_padded + first_row) * HEAD_DIM;
    // The thread's fragments as an m16n8 accumulator over all D: block 8 half + chunk.
    float accumulator[HEAD_DIM / 8][4];
#pragma unroll
    for (int half = 0; half < HEAD_DIM / 64; ++half)
#pragma unroll
        for (int chunk = 0; chunk < 8; ++chunk) {
            const float4 value = *reinterpret_cast<const float4*>(
                tile + DqTileLayout::offset(half, chunk, thread));
            float* const block = accumulator[8 * half + chunk];
            block[0] = value.x; block[1] = value.y; block[2] = value.z; block[3] = value.w;
        }
    long long offset[2], extra[2];
    bool valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = first_row + DqTileLayout::row(thread, r);
        valid[r] = row < params.n_queries;
        offset[r] = (slab * params.n_queries + row) * HEAD_DIM + DqTileLayout::column(thread, 0);
        extra[r] = slab * params.dq_addend_slab + (long long)row * HEAD_DIM +
                   DqTileLayout::column(thread, 0);
    }
    store_fragment_rows<Element>(params.dq, offset, params.dq_addend, extra, valid, accumulator,
                                 1.f, params.grad_float32);
}

// The 64-row step of `walk` into buffer `buffer`: Q, dO, and the rows' lse_log2 and delta
// (16 copies of 16 bytes each, by the first warp). Commits nothing.
template <class Traits>
__device__ __forceinline__ void load_query_step(const BackwardParams& params, const QueryWalk& walk,
                                                int batch, int kv_head, int buffer,
                                                unsigned short* q_tiles,
                                                unsigned short* d_out_tiles, float* row_stats) {
    using Tile = typename Traits::Tile;
    const int head = walk.head(params, kv_head);
    const int first_row = walk.first_row(params);
    load_tile_async<Tile, 64>(q_tiles + buffer * Traits::kTileElements,
                              params.q + batch * params.q_batch_stride +
                                  head * params.q_head_stride,
                              params.q_row_stride, first_row, params.n_queries);
    load_tile_async<Tile, 64>(d_out_tiles + buffer * Traits::kTileElements,
                              params.d_out + batch * params.d_out_batch_stride +
                                  head * params.d_out_head_stride,
                              params.d_out_row_stride, first_row, params.n_queries);
    if (threadIdx.x < 32) {
        // n_rows_padded covers every row of every forward tile: no bounds check.
        const int which = threadIdx.x >> 4, chunk = threadIdx.x & 15;
        const float* source = (which ? params.delta : params.lse_log2) +
                              ((long long)batch * params.n_heads + head) * params.n_rows_padded +
                              first_row + chunk * 4;
        copy_async_16(shared_address(row_stats + buffer * 128 + which * 64 + chunk * 4), source,
                      16);
    }
}

template <class Element, int HEAD_DIM, int WARPS, bool ACCUMULATE_DQ>
__global__ void __launch_bounds__(WARPS * 32, 2)
    attention_backward_dkdv(const __grid_constant__ BackwardParams params) {
    using Traits = BackwardTraits<HEAD_DIM, WARPS>;
    using Tile = typename Traits::Tile;
    constexpr int kDimSteps = Traits::kDimSteps;
    constexpr int kDimBlocks = Traits::kDimBlocks;
    constexpr int kQueryBlocks = Traits::kStepBlocks;

    extern __shared__ __align__(128) unsigned char shared_raw[];
    unsigned short* shared = reinterpret_cast<unsigned short*>(shared_raw);
    unsigned short* k_tile = shared + Traits::kKOffset;
    unsigned short* v_tile = shared + Traits::kVOffset;
    unsigned short* q_tiles = shared + Traits::kQOffset;
    unsigned short* d_out_tiles = shared + Traits::kDOutOffset;
    unsigned short* ds_tile = shared + Traits::kDsOffset;
    float* row_stats = reinterpret_cast<float*>(shared_raw + Traits::kRowStatsByteOffset);

    const int key_tile = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z;
    const int n_key_tiles = gridDim.x;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int first_key = key_tile * 64;
    const int warp_key = warp * Traits::kRowsPerWarp;
    const int valid_keys = min(64, params.n_keys - first_key);
    const float scale_log2 = params.scale_log2;

    load_tile_async<Tile, 64>(k_tile,
                              params.k + batch * params.k_batch_stride +
                                  kv_head * params.k_head_stride,
                              params.k_row_stride, first_key, params.n_keys);
    load_tile_async<Tile, 64>(v_tile,
                              params.v + batch * params.v_batch_stride +
                                  kv_head * params.v_head_stride,
                              params.v_row_stride, first_key, params.n_keys);
    QueryWalk walk;
    walk.member = 0;
    walk.open(params, batch, kv_head, key_tile, n_key_tiles);
    if (walk.valid(params))
        load_query_step<Traits>(params, walk, batch, kv_head, 0, q_tiles, d_out_tiles, row_stats);
    copy_async_commit();

    // The two keys (rows of S^T) this lane owns; padded keys get P = 0.
    bool key_valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) key_valid[r] = warp_key + (lane >> 2) + 8 * r < valid_keys;

    float dk[kDimBlocks][4], dv[kDimBlocks][4];
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[db][e] = dv[db][e] = 0.f;

    for (int step = 0; walk.valid(params); ++step) {
        const int buffer = step & 1;
        const int head = walk.head(params, kv_head);
        const int first_row = walk.first_row(params);
        QueryWalk next = walk;
        next.advance(params, batch, kv_head, key_tile, n_key_tiles);
        copy_async_wait<0>();
        // This step's tiles have landed for every thread; every warp is done with the buffer
        // the prefetch overwrites (step - 1) and with dS^T of step - 1.
        __syncthreads();
        if (next.valid(params))
            load_query_step<Traits>(params, next, batch, kv_head, buffer ^ 1, q_tiles,
                                    d_out_tiles, row_stats);
        copy_async_commit();

        const unsigned short* q_step = q_tiles + buffer * Traits::kTileElements;
        const unsigned short* d_out_step = d_out_tiles + buffer * Traits::kTileElements;
        const float* lse_step = row_stats + buffer * 128;
        const float* delta_step = lse_step + 64;

        // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries a warp. The B operands (Q, dO
        // rows) are the forward's K-operand layout.
        float s[kQueryBlocks][4], dp[kQueryBlocks][4];
#pragma unroll
        for (int nb = 0; nb < kQueryBlocks; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kDimSteps; ++ks) {
            unsigned a_k[4], a_v[4];
            const int a_offset = Tile::swizzle(warp_key + (lane & 15), ks * 2 + (lane >> 4));
            load_matrix_x4(a_k, shared_address(k_tile + a_offset));
            load_matrix_x4(a_v, shared_address(v_tile + a_offset));
#pragma unroll
            for (int pair = 0; pair < kQueryBlocks / 2; ++pair) {
                const int matrix = lane >> 3;
                const int b_offset = Tile::swizzle(pair * 16 + (matrix >> 1) * 8 + (lane & 7),
                                                   ks * 2 + (matrix & 1));
                unsigned b[4];
                load_matrix_x4(b, shared_address(q_step + b_offset));
                Element::mma(s[2 * pair], a_k, b[0], b[1]);
                Element::mma(s[2 * pair + 1], a_k, b[2], b[3]);
                load_matrix_x4(b, shared_address(d_out_step + b_offset));
                Element::mma(dp[2 * pair], a_v, b[0], b[1]);
                Element::mma(dp[2 * pair + 1], a_v, b[2], b[3]);
            }
        }

        // P^T and dS^T = P^T (dP^T - delta), in place (s becomes P, dp becomes dS).
#pragma unroll
        for (int nb = 0; nb < kQueryBlocks; ++nb) {
            const int query = nb * 8 + 2 * (lane & 3);
            const float2 lse = *reinterpret_cast<const float2*>(lse_step + query);
            const float2 delta = *reinterpret_cast<const float2*>(delta_step + query);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float row_lse = (e & 1) ? lse.y : lse.x;
                const float row_delta = (e & 1) ? delta.y : delta.x;
                const float p = key_valid[e >> 1]
                                    ? fast_exp2(fmaf(s[nb][e], scale_log2, -row_lse))
                                    : 0.f;
                s[nb][e] = p;
                dp[nb][e] = p * (dp[nb][e] - row_delta);
            }
        }

        // dV += P^T dO and dK += dS^T Q: the accumulator layout of two n8 blocks is the A
        // layout of one k16 step (as P.V in the forward); dO and Q rows go through ldmatrix.trans.
#pragma unroll
        for (int kstep = 0; kstep < kQueryBlocks / 2; ++kstep) {
            unsigned a_p[4], a_ds[4];
            a_p[0] = Element::pack(s[2 * kstep][0], s[2 * kstep][1]);
            a_p[1] = Element::pack(s[2 * kstep][2], s[2 * kstep][3]);
            a_p[2] = Element::pack(s[2 * kstep + 1][0], s[2 * kstep + 1][1]);
            a_p[3] = Element::pack(s[2 * kstep + 1][2], s[2 * kstep + 1][3]);
            a_ds[0] = Element::pack(dp[2 * kstep][0], dp[2 * kstep][1]);
            a_ds[1] = Element::pack(dp[2 * kstep][2], dp[2 * kstep][3]);
            a_ds[2] = Element::pack(dp[2 * kstep + 1][0], dp[2 * kstep + 1][1]);
            a_ds[3] = Element::pack(dp[2 * kstep + 1][2], dp[2 * kstep + 1][3]);
#pragma unroll
            for (int pair = 0; pair < kDimBlocks / 2; ++pair) {
                const int matrix = lane >> 3;
                const int b_offset = Tile::swizzle(kstep * 16 + (matrix & 1) * 8 + (lane & 7),
                                                   pair * 2 + (matrix >> 1));
                unsigned b[4];
                load_matrix_x4_transposed(b, shared_address(d_out_step + b_offset));
                Element::mma(dv[2 * pair], a_p, b[0], b[1]);
                Element::mma(dv[2 * pair + 1], a_p, b[2], b[3]);
                load_matrix_x4_transposed(b, shared_address(q_step + b_offset));
                Element::mma(dk[2 * pair], a_ds, b[0], b[1]);
                Element::mma(dk[2 * pair + 1], a_ds, b[2], b[3]);
            }
        }

        if (ACCUMULATE_DQ) {
            // scale * dS^T to shared memory (keys x queries), then warp w adds rows
            // 16w..16w+15 of scale * dS K over all 64 keys.
#pragma unroll
            for (int nb = 0; nb < kQueryBlocks; ++nb)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int key = warp_key + (lane >> 2) + 8 * r;
                    *reinterpret_cast<unsigned*>(ds_tile + Traits::ds_swizzle(key, nb) +
                                                 2 * (lane & 3)) =
                        Element::pack(dp[nb][2 * r] * params.scale,
                                      dp[nb][2 * r + 1] * params.scale);
                }
            __syncthreads();
            unsigned a_ds[4][4];
#pragma unroll
            for (int kstep = 0; kstep < 4; ++kstep) {
                const int matrix = lane >> 3;
                load_matrix_x4_transposed(
                    a_ds[kstep],
                    shared_address(ds_tile + Traits::ds_swizzle(
                                                 kstep * 16 + (matrix >> 1) * 8 + (lane & 7),
                                                 warp * 2 + (matrix & 1))));
            }
            const long long slab = (long long)batch * params.n_heads + head;
            int rows[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) rows[r] = first_row + warp * 16 + (lane >> 2) + 8 * r;
#pragma unroll
            for (int pair = 0; pair < kDimBlocks / 2; ++pair) {
                float dq[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                for (int kstep = 0; kstep < 4; ++kstep) {
                    const int matrix = lane >> 3;
                    unsigned b[4];
                    load_matrix_x4_transposed(
                        b, shared_address(k_tile + Tile::swizzle(
                                                       kstep * 16 + (matrix & 1) * 8 + (lane & 7),
                                                       pair * 2 + (matrix >> 1))));
                    Element::mma(dq[0], a_ds[kstep], b[0], b[1]);
                    Element::mma(dq[1], a_ds[kstep], b[2], b[3]);
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    if (rows[r] >= params.n_queries) continue;
                    float* row_accumulator =
                        params.dq_accumulator + (slab * params.n_queries + rows[r]) * HEAD_DIM +
                        2 * (lane & 3);
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        atomic_add_pair(row_accumulator + (pair * 2 + j) * 8, dq[j][2 * r],
                                        dq[j][2 * r + 1]);
                }
            }
        }
        walk = next;
    }
    copy_async_wait<0>();

    store_key_gradients<Element, HEAD_DIM>(params, (long long)batch * gridDim.y + kv_head,
                                           first_key + warp_key, lane, dk, dv);
}

// Deterministic dQ: grid (n_rows_padded / 64, Hq, B); warp w owns rows 16w..16w+15 of the CTA's
// 64 and walks the forward tile's query-major list in its stored order.
template <class Element, int HEAD_DIM, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 2)
    attention_backward_dq(const __grid_constant__ BackwardParams params) {
    using Traits = BackwardTraits<HEAD_DIM, WARPS>;
    using Tile = typename Traits::Tile;
    constexpr int kDimSteps = Traits::kDimSteps;
    constexpr int kDimBlocks = Traits::kDimBlocks;
    constexpr int kKeyBlocks = Traits::kStepBlocks;

    extern __shared__ __align__(128) unsigned char shared_raw[];
    unsigned short* shared = reinterpret_cast<unsigned short*>(shared_raw);
    unsigned short* q_tile = shared;
    unsigned short* d_out_tile = shared + Traits::kTileElements;
    unsigned short* k_tiles = shared + 2 * Traits::kTileElements;
    unsigned short* v_tiles = shared + 4 * Traits::kTileElements;

    const int head = blockIdx.y, batch = blockIdx.z;
    const int kv_head = head / params.head_group;
    const int first_row = blockIdx.x * 64;
    const int query_tile = first_row / params.block_q;
    const int n_query_tiles = params.n_rows_padded / params.block_q;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int warp_row = warp * Traits::kRowsPerWarp;
    const float scale_log2 = params.scale_log2;
    const long long slab = (long long)batch * params.n_heads + head;
    const int* offsets = params.row_offsets + slab * (n_query_tiles + 1) + query_tile;
    const int start = offsets[0];
    const int n_visit = offsets[1] - start;
    const int* tiles = params.row_indices + slab * params.row_capacity + start;
    const unsigned short* k_slab =
        params.k + batch * params.k_batch_stride + kv_head * params.k_head_stride;
    const unsigned short* v_slab =
        params.v + batch * params.v_batch_stride + kv_head * params.v_head_stride;

    load_tile_async<Tile, 64>(q_tile,
                              params.q + batch * params.q_batch_stride +
                                  head * params.q_head_stride,
                              params.q_row_stride, first_row, params.n_queries);
    load_tile_async<Tile, 64>(d_out_tile,
                              params.d_out + batch * params.d_out_batch_stride +
                                  head * params.d_out_head_stride,
                              params.d_out_row_stride, first_row, params.n_queries);
    int next_tile = n_visit > 0 ? tiles[0] : 0;
    load_tile_async<Tile, 64>(k_tiles, k_slab, params.k_row_stride, next_tile * 64,
                              params.n_keys);
    load_tile_async<Tile, 64>(v_tiles, v_slab, params.v_row_stride, next_tile * 64,
                              params.n_keys);
    copy_async_commit();

    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long flat =
            slab * params.n_rows_padded + first_row + warp_row + (lane >> 2) + 8 * r;
        row_lse[r] = params.lse_log2[flat];
        row_delta[r] = params.delta[flat];
    }

    float dq[kDimBlocks][4];
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[db][e] = 0.f;

    for (int step = 0; step < n_visit; ++step) {
        const int key_tile = next_tile;
        const int buffer = step & 1;
        copy_async_wait<0>();
        __syncthreads();
        if (step + 1 < n_visit) {
            next_tile = tiles[step + 1];
            const int other = buffer ^ 1;
            load_tile_async<Tile, 64>(k_tiles + other * Traits::kTileElements, k_slab,
                                      params.k_row_stride, next_tile * 64, params.n_keys);
            load_tile_async<Tile, 64>(v_tiles + other * Traits::kTileElements, v_slab,
                                      params.v_row_stride, next_tile * 64, params.n_keys);
        }
        copy_async_commit();
        const unsigned short* k_tile = k_tiles + buffer * Traits::kTileElements;
        const unsigned short* v_tile = v_tiles + buffer * Traits::kTileElements;

        // S = Q K^T and dP = dO V^T: 16 rows x 64 keys a warp (the forward's Q.K^T).
        float s[kKeyBlocks][4], dp[kKeyBlocks][4];
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kDimSteps; ++ks) {
            unsigned a_q[4], a_d_out[4];
            const int a_offset = Tile::swizzle(warp_row + (lane & 15), ks * 2 + (lane >> 4));
            load_matrix_x4(a_q, shared_address(q_tile + a_offset));
            load_matrix_x4(a_d_out, shared_address(d_out_tile + a_offset));
#pragma unroll
            for (int pair = 0; pair < kKeyBlocks / 2; ++pair) {
                const int matrix = lane >> 3;
                const int b_offset = Tile::swizzle(pair * 16 + (matrix >> 1) * 8 + (lane & 7),
                                                   ks * 2 + (matrix & 1));
                unsigned b[4];
                load_matrix_x4(b, shared_address(k_tile + b_offset));
                Element::mma(s[2 * pair], a_q, b[0], b[1]);
                Element::mma(s[2 * pair + 1], a_q, b[2], b[3]);
                load_matrix_x4(b, shared_address(v_tile + b_offset));
                Element::mma(dp[2 * pair], a_d_out, b[0], b[1]);
                Element::mma(dp[2 * pair + 1], a_d_out, b[2], b[3]);
            }
        }
        // scale * dS = scale * P (dP - delta), padded keys masked to P = 0.
        const int valid_keys = min(64, params.n_keys - key_tile * 64);
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = nb * 8 + 2 * (lane & 3) + (e & 1);
                const int r = e >> 1;
                const float p = key < valid_keys
                                    ? fast_exp2(fmaf(s[nb][e], scale_log2, -row_lse[r]))
                                    : 0.f;
                dp[nb][e] = p * (dp[nb][e] - row_delta[r]) * params.scale;
            }
        // dQ += dS K with dS straight from the accumulators; K rows through ldmatrix.trans.
#pragma unroll
        for (int kstep = 0; kstep < kKeyBlocks / 2; ++kstep) {
            unsigned a[4];
            a[0] = Element::pack(dp[2 * kstep][0], dp[2 * kstep][1]);
            a[1] = Element::pack(dp[2 * kstep][2], dp[2 * kstep][3]);
            a[2] = Element::pack(dp[2 * kstep + 1][0], dp[2 * kstep + 1][1]);
            a[3] = Element::pack(dp[2 * kstep + 1][2], dp[2 * kstep + 1][3]);
#pragma unroll
            for (int pair = 0; pair < kDimBlocks / 2; ++pair) {
                const int matrix = lane >> 3;
                unsigned b[4];
                load_matrix_x4_transposed(
                    b, shared_address(k_tile + Tile::swizzle(
                                                   kstep * 16 + (matrix & 1) * 8 + (lane & 7),
                                                   pair * 2 + (matrix >> 1))));
                Element::mma(dq[2 * pair], a, b[0], b[1]);
                Element::mma(dq[2 * pair + 1], a, b[2], b[3]);
            }
        }
    }
    copy_async_wait<0>();

    long long offset[2], extra[2];
    bool valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = first_row + warp_row + (lane >> 2) + 8 * r;
        valid[r] = row < params.n_queries;
        offset[r] = (slab * params.n_queries + row) * HEAD_DIM + 2 * (lane & 3);
        extra[r] = slab * params.dq_addend_slab + (long long)row * HEAD_DIM + 2 * (lane & 3);
    }
    store_fragment_rows<Element>(params.dq, offset, params.dq_addend, extra, valid, dq, 1.f,
                                 params.grad_float32);
}

}  // namespace psa
