// Shape of the backward CTAs and the walk over the lists they visit.
//
// Every backward CTA has WARPS = 4 warps and works in 64 x 64 blocks: 64 keys (one forward key
// tile) against 64 query rows (a 64-row forward tile, or one half of a 128-row tile). The 16-bit
// tiles use the forward's swizzled layout (TileTraits of a 64-row tile), so the forward's
// loader (tile_masking.cuh) and ldmatrix addressing carry over unchanged.
#pragma once

#include "backward_params.cuh"
#include "tile_traits.cuh"

namespace psa {

// The dQ accumulator of the wgmma families (BackwardParams::dq_tiles): float32
// (B, Hq, n_rows_padded, D) like the row layout, but each 64-row step's 64 x D block holds,
// 64-dim half by half, the m64n64 wgmma accumulator fragments of its 128 threads chunk-major:
// float4 `chunk` of thread t (its dq[chunk][0..3]) at 512 chunk + 4 t. Neighbouring threads'
// chunks are neighbours, so staging a half in shared memory is free of bank conflicts and a
// half is one contiguous 16 KB bulk reduction; attention_backward_dq_from_tiles reads it back.
struct DqTileLayout {
    static constexpr int kHalfFloats = 64 * 64;
    static constexpr unsigned kHalfBytes = kHalfFloats * 4;
    __host__ __device__ static __forceinline__ int offset(int half, int chunk, int thread) {
        return half * kHalfFloats + chunk * 512 + thread * 4;
    }
    // Row (within the step) and column (within the half) of elements 2 r and 2 r + 1 of a
    // chunk: the wgmma accumulator layout (warp w: rows 16 w..16 w + 15).
    __host__ __device__ static __forceinline__ int row(int thread, int r) {
        return 16 * (thread >> 5) + ((thread & 31) >> 2) + 8 * r;
    }
    __host__ __device__ static __forceinline__ int column(int thread, int chunk) {
        return 8 * chunk + 2 * (thread & 3);
    }
};

template <int HEAD_DIM, int WARPS>
struct BackwardTraits {
    static_assert(WARPS == 4, "four warps of 16 keys (dK/dV) or 16 query rows (dQ)");
    using Tile = TileTraits<HEAD_DIM, 64, 64, WARPS>;
    static constexpr int kStep = 64;                    // rows (or keys) of one block
    static constexpr int kRowsPerWarp = kStep / WARPS;  // 16: one m16 fragment
    static constexpr int kDimSteps = HEAD_DIM / 16;     // k16 steps over D
    static constexpr int kDimBlocks = HEAD_DIM / 8;     // n8 blocks over D
    static constexpr int kStepBlocks = kStep / 8;       // n8 blocks over 64 rows or keys
    static constexpr int kTileElements = kStep * HEAD_DIM;

    // dK/dV pass, in 16-bit elements: K, V, two Q and two dO buffers, dS^T (64 x 64); then,
    // in floats, two buffers of the step's LSE (log2) and delta (64 each).
    static constexpr int kKOffset = 0;
    static constexpr int kVOffset = kTileElements;
    static constexpr int kQOffset = 2 * kTileElements;
    static constexpr int kDOutOffset = 4 * kTileElements;
    static constexpr int kDsOffset = 6 * kTileElements;
    static constexpr int kRowStatsByteOffset = 2 * (6 * kTileElements + kStep * kStep);
    static constexpr int kDkdvSharedBytes = kRowStatsByteOffset + 2 * 2 * kStep * 4;

    // Deterministic dQ pass: Q, dO, two K and two V buffers.
    static constexpr int kDqSharedBytes = 2 * 6 * kTileElements;

    // dS^T tile (keys x 64 queries): eight 16-byte chunks a row, the forward's XOR swizzle.
    __device__ static constexpr int ds_swizzle(int row, int chunk) {
        return row * kStep + ((chunk ^ (row & 7)) << 3);
    }
};

// The dK/dV CTA's walk: for each query head of the kv head's group, its key-major list of the
// query tiles that kept this key tile, each tile in 64-row steps. Every advance moves forward,
// so the walk ends after (list lengths x steps per tile) steps.
struct QueryWalk {
    int member;        // query head within the group; head_group when the walk is over
    int entry;         // position in that head's list
    int half;          // 64-row step within the forward query tile
    int count;
    const int* tiles;

    __device__ __forceinline__ bool valid(const BackwardParams& params) const {
        return member < params.head_group;
    }
    __device__ __forceinline__ int head(const BackwardParams& params, int kv_head) const {
        return kv_head * params.head_group + member;
    }
    __device__ __forceinline__ int first_row(const BackwardParams& params) const {
        return tiles[entry] * params.block_q + half * 64;
    }

    // Open the list of `member`, or of the next member with a non-empty list.
    __device__ __forceinline__ void open(const BackwardParams& params, int batch, int kv_head,
                                         int key_tile, int n_key_tiles) {
        entry = 0;
        half = 0;
        for (; member < params.head_group; ++member) {
            const long long slab = (long long)batch * params.n_heads + kv_head * params.head_group
                                   + member;
            const int* offsets = params.col_offsets + slab * (n_key_tiles + 1) + key_tile;
            const int start = offsets[0];
            count = offsets[1] - start;
            tiles = params.col_indices + slab * params.col_capacity + start;
            if (count > 0) break;
        }
    }

    __device__ __forceinline__ void advance(const BackwardParams& params, int batch, int kv_head,
                                            int key_tile, int n_key_tiles) {
        if (++half < params.block_q / 64) return;
        half = 0;
        if (++entry < count) return;
        ++member;
        open(params, batch, kv_head, key_tile, n_key_tiles);
    }
};

// The walk of a CTA over TILES adjacent key tiles (first_tile, first_tile + 1, ...): for each
// query head of the group, the union of their key-major lists (each ascending), merged in
// ascending order, each query tile in 64-row steps. `kept` has bit t set when key tile
// first_tile + t kept the current query tile; the others must contribute nothing to it. Key
// tiles past the last one have empty lists. With TILES = 1 it visits what QueryWalk visits.
template <int TILES>
struct MergedQueryWalk {
    int member;        // query head within the group; head_group when the walk is over
    int half;          // 64-row step within the forward query tile
    int tile;          // current query tile
    unsigned kept;
    int position[TILES], count[TILES];
    const int* tiles[TILES];

    __device__ __forceinline__ bool valid(const BackwardParams& params) const {
        return member < params.head_group;
    }
    __device__ __forceinline__ int head(const BackwardParams& params, int kv_head) const {
        return kv_head * params.head_group + member;
    }
    __device__ __forceinline__ int first_row(const BackwardParams& params) const {
        return tile * params.block_q + half * 64;
    }

    // The smallest query tile still ahead in any list, and which lists hold it.
    __device__ __forceinline__ void pick() {
        tile = 0x7fffffff;
#pragma unroll
        for (int t = 0; t < TILES; ++t)
            if (position[t] < count[t]) tile = min(tile, tiles[t][position[t]]);
        kept = 0;
#pragma unroll
        for (int t = 0; t < TILES; ++t)
            if (position[t] < count[t] && tiles[t][position[t]] == tile) kept |= 1u << t;
    }

    // Open the lists of `member`, or of the next member with a non-empty union.
    __device__ __forceinline__ void open(const BackwardParams& params, int batch, int kv_head,
                                         int first_tile, int n_key_tiles) {
        half = 0;
        for (; member < params.head_group; ++member) {
            const long long slab = (long long)batch * params.n_heads + kv_head * params.head_group
                                   + member;
            int total = 0;
#pragma unroll
            for (int t = 0; t < TILES; ++t) {
                const int key_tile = first_tile + t;
                position[t] = 0;
                count[t] = 0;
                tiles[t] = params.col_indices;
                if (key_tile < n_key_tiles) {
                    const int* offsets = params.col_offsets + slab * (n_key_tiles + 1) + key_tile;
                    const int start = offsets[0];
                    count[t] = offsets[1] - start;
                    tiles[t] = params.col_indices + slab * params.col_capacity + start;
                }
                total += count[t];
            }
            if (total > 0) {
                pick();
                break;
            }
        }
    }

    __device__ __forceinline__ void advance(const BackwardParams& params, int batch, int kv_head,
                                            int first_tile, int n_key_tiles) {
        if (++half < params.block_q / 64) return;
        half = 0;
        bool more = false;
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
            position[t] += (kept >> t) & 1u;
            more = more || position[t] < count[t];
        }
        if (more) {
            pick();
            return;
        }
        ++member;
        open(params, batch, kv_head, first_tile, n_key_tiles);
    }
};

// A thread's share of an m16n8-layout accumulator tile (rows r = 0, 1: values 2 r, 2 r + 1 of
// each n8 column block), scaled, plus another branch's float32 gradient where `addend` is
// given (BackwardParams; the sum rounded once), stored as float32 or the 16-bit element type.
// Row r's first pair goes to `offset[r]` and reads the addend at `addend_offset[r]` (block nb
// 8 nb further); a row with `valid[r]` false is neither read nor written. A row's addend loads
// are all issued before its first store: the stores may alias the addend as far as the
// compiler can tell, so a load interleaved with them waits behind the store before, which
// waits for the load before it: one round trip per pair (the dK/dV epilogue's addend cost
// sla_vjp's sparse call 0.46 ms on an H200 so).
template <class Element, int kBlocks>
__device__ __forceinline__ void store_fragment_rows(void* base, const long long (&offset)[2],
                                                    const float* addend,
                                                    const long long (&addend_offset)[2],
                                                    const bool (&valid)[2],
                                                    const float (&accumulator)[kBlocks][4],
                                                    float scale, bool float32) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!valid[r]) continue;
        float2 extra[kBlocks];
        if (addend != nullptr) {
#pragma unroll
            for (int nb = 0; nb < kBlocks; ++nb)
                extra[nb] = *reinterpret_cast<const float2*>(addend + addend_offset[r] + nb * 8);
        }
#pragma unroll
        for (int nb = 0; nb < kBlocks; ++nb) {
            float lo = accumulator[nb][2 * r] * scale, hi = accumulator[nb][2 * r + 1] * scale;
            if (addend != nullptr) {
                // __fadd_rn: never contracted with the scaling into an FMA, so the sum is the
                // float32 gradient plus the addend, exactly as a separate pass would add them.
                lo = __fadd_rn(lo, extra[nb].x);
                hi = __fadd_rn(hi, extra[nb].y);
            }
            const long long at = offset[r] + nb * 8;
            if (float32)
                *reinterpret_cast<float2*>(static_cast<float*>(base) + at) = make_float2(lo, hi);
            else
                *reinterpret_cast<unsigned*>(static_cast<unsigned short*>(base) + at) =
                    Element::pack(lo, hi);
        }
    }
}

// The dK/dV epilogue of every dK/dV family: dK = scale * sum dS^T Q and dV, C-contiguous
// (B, Hkv, Nk, D), from the m16n8 accumulator layout (a warp's 16 keys from `first_key`, lane
// quad rows, kDimBlocks n8 column blocks); rows past Nk unwritten.
template <class Element, int HEAD_DIM, int kDimBlocks>
__device__ __forceinline__ void store_key_gradients(const BackwardParams& params,
                                                    long long kv_slab, int first_key, int lane,
                                                    const float (&dk)[kDimBlocks][4],
                                                    const float (&dv)[kDimBlocks][4]) {
    long long offset[2], dk_extra[2], dv_extra[2];
    bool valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = first_key + (lane >> 2) + 8 * r;
        valid[r] = key < params.n_keys;
        offset[r] = (kv_slab * params.n_keys + key) * HEAD_DIM + 2 * (lane & 3);
        const long long in_slab = (long long)key * HEAD_DIM + 2 * (lane & 3);
        dk_extra[r] = kv_slab * params.dk_addend_slab + in_slab;
        dv_extra[r] = kv_slab * params.dv_addend_slab + in_slab;
    }
    store_fragment_rows<Element>(params.dk, offset, params.dk_addend, dk_extra, valid, dk,
                                 params.scale, params.grad_float32);
    store_fragment_rows<Element>(params.dv, offset, params.dv_addend, dv_extra, valid, dv, 1.f,
                                 params.grad_float32);
}

}  // namespace psa
