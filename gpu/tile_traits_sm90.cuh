// Compile-time shape of one CTA of the sm_90 (wgmma) forward: warpgroups, pipeline depth and
// the 128-byte-swizzled shared-memory layout that wgmma descriptors read.
#pragma once

namespace psa {

template <int HEAD_DIM, int BLOCK_Q, int BLOCK_K>
struct WarpgroupTileTraits {
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head dims 64 and 128");
    static_assert(BLOCK_Q == 64 || BLOCK_Q == 128, "query tiles of 64 or 128 rows");
    static_assert(BLOCK_K == 64, "key tiles of 64 keys");

    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockQ = BLOCK_Q;
    static constexpr int kBlockK = BLOCK_K;
    // One warpgroup (4 warps) per 64 query rows; each warp owns 16 rows.
    static constexpr int kWarpgroups = BLOCK_Q / 64;
    static constexpr int kThreads = kWarpgroups * 128;
    static constexpr int kChunksPerRow = HEAD_DIM / 8;  // 16-byte chunks of a row
    static constexpr int kKeyBlocks = BLOCK_K / 8;       // n8 blocks of S
    static constexpr int kDimBlocks = HEAD_DIM / 8;      // n8 blocks of O
    static constexpr int kDimSteps = HEAD_DIM / 16;      // k16 steps of Q.K^T
    static constexpr int kKeySteps = BLOCK_K / 16;       // k16 steps of P.V
    // K/V ring: a tile's V is read until the next tile's step (its P.V overlaps that softmax),
    // so kStages - 2 tiles can be in flight ahead of the one computed. The 64-row instance
    // keeps three stages so that two CTAs still share an SM at D = 128.
    static constexpr int kStages = BLOCK_Q == 128 ? 4 : 3;
    static constexpr int kTilesAhead = kStages - 2;

    // Shared memory, in 16-bit elements: Q, then kStages K tiles, then kStages V tiles; every
    // tile starts on a 1024-byte boundary (the swizzle atom), given a 1024-aligned base.
    static constexpr int kQElements = BLOCK_Q * HEAD_DIM;
    static constexpr int kKvElements = BLOCK_K * HEAD_DIM;
    static constexpr int kKOffset = kQElements;
    static constexpr int kVOffset = kQElements + kStages * kKvElements;
    static constexpr int kAlignment = 1024;
    static constexpr int kSharedBytes = 2 * (kQElements + 2 * kStages * kKvElements) + kAlignment;

    // Element offset of 16-byte chunk `chunk` of row `row` in a ROWS-row tile. Columns are
    // split into 64-element (128-byte) panels stored one after the other, ROWS x 128 bytes
    // each; inside a panel, chunk c of row r sits at c ^ (r % 8): the SW128 pattern wgmma
    // expects, and conflict-free for the 16-byte cp.async stores.
    template <int ROWS>
    __host__ __device__ static constexpr int tile_offset(int row, int chunk) {
        return (chunk >> 3) * ROWS * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
    }
    // Bytes between the 64-column panels of the Q tile and of a K/V tile.
    static constexpr unsigned kQPanelBytes = BLOCK_Q * 128;
    static constexpr unsigned kKvPanelBytes = BLOCK_K * 128;
};

}  // namespace psa

namespace psa {

// The warp-specialised forward (attention_forward_sm90_ws.cu): one producer warpgroup and
// BLOCK_Q / 64 consumer warpgroups; a ring of K_STAGES K tiles and, apart, V_STAGES V tiles
// (V is loaded only for kept tiles); the mbarriers and votes after the tiles. The stage counts
// come from the host's table (pysparse_attn/backends/cupy.py, SM90_WS_CONFIGS), which also
// computes kSharedBytes' value for the launch; the kernel traps if it got less.
template <int HEAD_DIM, int BLOCK_Q, int K_STAGES, int V_STAGES>
struct WarpSpecializedTraits : WarpgroupTileTraits<HEAD_DIM, BLOCK_Q, 64> {
    using Base = WarpgroupTileTraits<HEAD_DIM, BLOCK_Q, 64>;
    static_assert(K_STAGES >= 2 && V_STAGES >= 2, "two stages at least per pipeline");
    static constexpr int kKStages = K_STAGES;
    static constexpr int kVStages = V_STAGES;
    static constexpr int kConsumers = BLOCK_Q / 64;  // consumer warpgroups
    static constexpr int kThreads = 128 * (1 + kConsumers);
    static constexpr int kPanels = HEAD_DIM / 64;     // 64-column (128-byte) panels a row

    // Byte offsets from a 1024-aligned base.
    static constexpr unsigned kQBytes = 2u * BLOCK_Q * HEAD_DIM;
    static constexpr unsigned kKvBytes = 2u * 64 * HEAD_DIM;
    static constexpr unsigned kKOffset = kQBytes;
    static constexpr unsigned kVOffset = kKOffset + K_STAGES * kKvBytes;
    static constexpr unsigned kBarrierOffset = kVOffset + V_STAGES * kKvBytes;
    // Barriers, 8 bytes each: q_full, then per K stage k_full, k_empty, decided, then per V
    // stage v_full, v_empty.
    static constexpr int kBarriers = 1 + 3 * K_STAGES + 2 * V_STAGES;
    static constexpr unsigned kVoteOffset = kBarrierOffset + 8 * kBarriers;
    static constexpr unsigned kLayoutBytes = kVoteOffset + 4 * K_STAGES * kConsumers;
    static constexpr unsigned kSharedBytes = kLayoutBytes + Base::kAlignment;
};

}  // namespace psa
