// Compile-time shape of one CTA's work: tile sizes, warps, shared-memory layout and swizzle.
#pragma once

namespace psa {

template <int HEAD_DIM, int BLOCK_Q, int BLOCK_K, int WARPS>
struct TileTraits {
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head dims 64 and 128");
    static_assert(BLOCK_Q == 64 || BLOCK_Q == 128, "query tiles of 64 or 128 rows");
    static_assert(BLOCK_K == 64, "key tiles of 64 keys");
    static_assert(BLOCK_Q % (16 * WARPS) == 0 && BLOCK_Q / WARPS <= 32, "16 or 32 rows a warp");

    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockQ = BLOCK_Q;
    static constexpr int kBlockK = BLOCK_K;
    // Each warp owns BLOCK_Q / WARPS query rows, i.e. kMFrags m16 fragments. Two fragments
    // (32 rows) share every K and V fragment read from shared memory, which halves
    // shared-memory traffic per FLOP at the price of registers (the D = 128 accumulators).
    static constexpr int kWarps = WARPS;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kRowsPerWarp = BLOCK_Q / kWarps;
    static constexpr int kMFrags = kRowsPerWarp / 16;
    // With one fragment a warp keeps its Q slice in registers; with two, registers go to the
    // second accumulator and Q fragments are re-read from shared memory each tile.
    static constexpr bool kQInRegisters = kMFrags == 1;
    static constexpr int kChunksPerRow = HEAD_DIM / 8;       // 16-byte chunks of a row
    static constexpr int kKeyBlocks = BLOCK_K / 8;            // n8 blocks of S
    static constexpr int kDimBlocks = HEAD_DIM / 8;           // n8 blocks of O
    static constexpr int kDimSteps = HEAD_DIM / 16;           // k16 steps of Q.K^T

    // Shared memory, in 16-bit elements: Q, then two K buffers, then two V buffers.
    static constexpr int kQElements = BLOCK_Q * HEAD_DIM;
    static constexpr int kKvElements = BLOCK_K * HEAD_DIM;
    static constexpr int kKOffset = kQElements;
    static constexpr int kVOffset = kQElements + 2 * kKvElements;
    static constexpr int kSharedBytes = 2 * (kQElements + 4 * kKvElements);

    // Element offset of 16-byte chunk `chunk` of row `row`. XOR-ing the chunk with the row's
    // low three bits puts the eight rows an ldmatrix reads into eight different bank groups.
    __host__ __device__ static constexpr int swizzle(int row, int chunk) {
        return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
    }
    // The loader's view (gpu/tile_masking.cuh): a tile of any row count uses the same swizzle.
    template <int ROWS>
    __host__ __device__ static constexpr int tile_offset(int row, int chunk) {
        return swizzle(row, chunk);
    }
};

}  // namespace psa
