// Partial tiles: zero-filled loads of rows past the end, and -inf logits for padded keys.
#pragma once

#include "ptx.cuh"

namespace psa {

// Start the asynchronous copy of ROWS rows (from `first_row`, of `total_rows`) of a
// (rows x HEAD_DIM) slab with row stride `row_stride` into a shared tile laid out by Traits.
// Rows past the end are zero-filled: padded keys then give finite logits (masked next) and
// padded values contribute exact zeros, never NaN from stale memory.
template <class Traits, int ROWS>
__device__ __forceinline__ void load_tile_async(unsigned short* tile, const unsigned short* slab,
                                                long long row_stride, int first_row,
                                                int total_rows) {
    constexpr int kChunks = ROWS * Traits::kChunksPerRow;
    static_assert(kChunks % Traits::kThreads == 0, "every thread copies the same chunk count");
    // A thread keeps its chunk column and steps down kRowStep rows per copy; with kRowStep a
    // multiple of 8 the swizzle pattern repeats, so every copy is the first one plus a constant
    // (one add for each address instead of a full index computation).
    constexpr int kRowStep = Traits::kThreads / Traits::kChunksPerRow;
    static_assert(kRowStep % 8 == 0, "row step keeps the swizzle phase");
    constexpr int kSharedStep = 2 * Traits::template tile_offset<ROWS>(kRowStep, 0);  // bytes
    const int row = threadIdx.x / Traits::kChunksPerRow;
    const int chunk = threadIdx.x % Traits::kChunksPerRow;
    const unsigned destination =
        shared_address(tile) + 2 * Traits::template tile_offset<ROWS>(row, chunk);
    const unsigned short* source = slab + (long long)(first_row + row) * row_stride + chunk * 8;
    const long long source_step = kRowStep * row_stride;
#pragma unroll
    for (int i = 0; i < kChunks / Traits::kThreads; ++i) {
        const bool valid = first_row + row + i * kRowStep < total_rows;
        copy_async_16(destination + i * kSharedStep, valid ? source : slab, valid ? 16 : 0);
        source += source_step;
        // An opaque step: otherwise every i * source_step is hoisted out of the tile loop,
        // two registers each, which the wgmma kernel cannot spare.
        asm volatile("" : "+l"(source));
    }
}

// Set the logits of keys at or past `valid_keys` (within the tile) to -inf, so they drop out
// of the row max, the exponentials and every skip statistic.
template <int KEY_BLOCKS>
__device__ __forceinline__ void mask_padded_keys(float (&s)[KEY_BLOCKS][4], int valid_keys,
                                                 int lane) {
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = nb * 8 + 2 * (lane & 3) + (e & 1);
            if (key >= valid_keys) s[nb][e] = negative_infinity();
        }
    }
}

}  // namespace psa
