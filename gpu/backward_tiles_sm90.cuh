// Shared-memory layout of the sm_90a dK/dV CTA (attention_backward_sm90.cu): one warpgroup, 64
// keys (one forward key tile: the key-major lists are per 64-key tile, so a 128-key CTA would
// have to merge two lists), walked against 64-row query steps as in the mma.sync kernel.
//
// Every 16-bit tile is the wgmma 128-byte-swizzled layout of WarpgroupTileTraits (64-element
// panels, chunk c of row r at c ^ (r % 8)), so one descriptor form reads each of them as a
// K-major operand (S^T = K Q^T, dP^T = V dO^T) or an MN-major one (dV += P^T dO, dK += dS^T Q,
// dQ = dS K), and the forward's cp.async loader (tile_masking.cuh) fills them.
#pragma once

#include "tile_traits_sm90.cuh"

namespace psa {

template <int HEAD_DIM>
struct BackwardWarpgroupTraits : WarpgroupTileTraits<HEAD_DIM, 64, 64> {
    using Base = WarpgroupTileTraits<HEAD_DIM, 64, 64>;
    static_assert(Base::kThreads == 128, "one warpgroup: warp w owns keys 16w..16w+15");
    static constexpr int kStep = 64;  // query rows of one step, keys of the CTA

    // Byte offsets from a 1024-aligned base (the swizzle atom): K, V, two Q and two dO buffers,
    // dS^T (64 keys x 64 queries, one panel), then two buffers of the step's LSE (log2) and
    // delta, 64 floats each.
    static constexpr unsigned kTileBytes = 2u * 64 * HEAD_DIM;
    static constexpr unsigned kPanelBytes = 64 * 128;  // one 64-element panel of a 64-row tile
    static constexpr unsigned kKOffset = 0;
    static constexpr unsigned kVOffset = kTileBytes;
    static constexpr unsigned kQOffset = 2 * kTileBytes;
    static constexpr unsigned kDOutOffset = 4 * kTileBytes;
    static constexpr unsigned kDsOffset = 6 * kTileBytes;
    static constexpr unsigned kRowStatsOffset = kDsOffset + 2u * 64 * 64;
    static constexpr unsigned kLayoutBytes = kRowStatsOffset + 2 * 2 * 64 * 4;
    // What the host passes (pysparse_attn/backends/cupy.py, _backward_shared_bytes): the
    // layout plus the worst-case realignment of the dynamic shared-memory base.
    static constexpr unsigned kSharedBytes = kLayoutBytes + Base::kAlignment;
};

}  // namespace psa
