// Shape and shared-memory layout of the sm_90a dK/dV CTA (attention_backward_sm90.cu):
// KEY_TILES warpgroups, one per 64-key forward tile (warpgroup g owns the CTA's keys
// 64g..64g+63), walked against 64-row query steps as in the mma.sync kernel. Two tiles (128 keys,
// FlashAttention-3's choice at these head dims) halve the dQ atomics and the Q/dO loads per
// key; the plan's key-major lists are per 64-key tile, so such a CTA walks the union of two.
//
// Every 16-bit tile is the wgmma 128-byte-swizzled layout of WarpgroupTileTraits (64-element
// panels, chunk c of row r at c ^ (r % 8)), so one descriptor form reads each of them as a
// K-major operand (S^T = K Q^T, dP^T = V dO^T) or an MN-major one (dV += P^T dO, dK += dS^T Q,
// dQ = dS K), and the forward's cp.async loader (tile_masking.cuh) fills them.
#pragma once

#include "backward_tiles.cuh"
#include "tile_traits_sm90.cuh"

namespace psa {

template <int HEAD_DIM, int KEY_TILES>
struct BackwardWarpgroupTraits : WarpgroupTileTraits<HEAD_DIM, 64 * KEY_TILES, 64> {
    // The base's "query tile" of 64 * KEY_TILES rows stands for the CTA's keys: it gives the
    // thread count (one warpgroup a 64 rows) and the tile layout the loader uses.
    using Base = WarpgroupTileTraits<HEAD_DIM, 64 * KEY_TILES, 64>;
    static_assert(KEY_TILES == 1 || KEY_TILES == 2, "64 or 128 keys a CTA");
    static_assert(Base::kThreads == 128 * KEY_TILES, "one warpgroup per 64 keys");
    static constexpr int kKeyTiles = KEY_TILES;
    static constexpr int kKeys = 64 * KEY_TILES;
    static constexpr int kStep = 64;  // query rows of one step

    // Byte offsets from a 1024-aligned base (the swizzle atom): K and V (kKeys rows each), two
    // Q and two dO buffers (64 rows), dS^T (kKeys x 64 queries, one panel), two buffers of the
    // step's LSE (log2) and delta, 64 floats each, then the dQ staging (below).
    static constexpr unsigned kKeyTileBytes = 2u * kKeys * HEAD_DIM;
    static constexpr unsigned kQueryTileBytes = 2u * 64 * HEAD_DIM;
    static constexpr unsigned kKeyPanelBytes = kKeys * 128;  // a 64-column panel of K or V
    static constexpr unsigned kQueryPanelBytes = 64 * 128;   // of Q or dO
    static constexpr unsigned kKOffset = 0;
    static constexpr unsigned kVOffset = kKeyTileBytes;
    static constexpr unsigned kQOffset = 2 * kKeyTileBytes;
    static constexpr unsigned kDOutOffset = kQOffset + 2 * kQueryTileBytes;
    static constexpr unsigned kDsOffset = kDOutOffset + 2 * kQueryTileBytes;
    static constexpr unsigned kRowStatsOffset = kDsOffset + 2u * kKeys * 64;
    static constexpr unsigned kStagingOffset = kRowStatsOffset + 2 * 2 * 64 * 4;
    // dQ is staged in shared memory, 64 rows x 64 dims of float32 at a time (DqTileLayout),
    // for one bulk reduction a half: in a buffer of its own where it fits (a second one, for
    // the reduction to read during the whole next step, measured no faster on an H200). The
    // 64-key CTA at D = 128, whose two CTAs an SM leave no room for it, stages in its step's
    // dO (half 0) and Q (half 1) buffers instead, 16 KB each, dead once the step's dV/dK
    // products are done.
    static constexpr unsigned kStagingBytes = (HEAD_DIM / 64) * DqTileLayout::kHalfBytes;
    static constexpr unsigned kSharedPerSm = 227u * 1024;
    static constexpr int kCtasPerSm = KEY_TILES == 1 ? 2 : 1;
    static constexpr bool kStagesInStepBuffers =
        kCtasPerSm * (kStagingOffset + kStagingBytes + Base::kAlignment) > kSharedPerSm;
    static_assert(!kStagesInStepBuffers || kQueryTileBytes == DqTileLayout::kHalfBytes,
                  "a step's Q and dO buffers hold one dQ half each");
    static constexpr unsigned kLayoutBytes =
        kStagingOffset + (kStagesInStepBuffers ? 0 : kStagingBytes);
    static_assert(kCtasPerSm * (kLayoutBytes + Base::kAlignment) <= kSharedPerSm,
                  "the CTAs an SM the launch bounds ask for fit");
    // What the host passes (pysparse_attn/backends/cupy.py, _backward_shared_bytes): the
    // layout plus the worst-case realignment of the dynamic shared-memory base.
    static constexpr unsigned kSharedBytes = kLayoutBytes + Base::kAlignment;
};

}  // namespace psa
