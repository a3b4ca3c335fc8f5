// The dK/dV pass of the attention backward on Hopper warpgroup MMA (wgmma, sm_90a), docs/design.rst
// section 7. Same contract and BackwardParams as attention_backward_dkdv in
// attention_backward.cu, whose lists, preprocess, deterministic dQ pass and postprocess it is
// used with (they are launched from that module; only this pass changes engine).
//
// One CTA per (KEY_TILES forward key tiles, kv head, batch), one warpgroup per 64-key tile:
// K and V resident in shared memory, dK and dV in fp32 registers (warp w owns the CTA's keys
// 16w..16w+15, the wgmma accumulator layout). It walks the key-major lists of every query
// head of the GQA group (so dK/dV need no atomics), for two tiles their union
// (MergedQueryWalk; a warpgroup whose tile did not keep the step masks its P to 0), in 64-row
// steps, Q, dO and the row statistics double-buffered by cp.async and shared by the
// warpgroups. Per step, in the transposed frame (keys as rows, M = 64 of wgmma):
//   S^T = K Q^T and dP^T = V dO^T    two ss chains over D, both operands K-major; the
//                                    exponentials of P^T run while dP^T is still in flight,
//   P^T = exp2(S^T scale_log2 - lse_log2), dS^T = P^T (dP^T - delta),
//   dV += P^T dO and dK += dS^T Q    register-A wgmma (the accumulators repacked as A
//                                    fragments), dO and Q read MN-major,
//   with ACCUMULATE_DQ: dS^T to shared memory as produced (keys x queries), then
//   dQ = dS K in 64-dim halves       ss with both operands MN-major (tnspA, tnspB) over all
//                                    the CTA's keys, half h by warpgroup h % KEY_TILES;
//                                    issued before dV/dK's products where each warpgroup has
//                                    one half and a staging buffer of its own (the 128-key
//                                    CTA at D = 128, the 64-key CTA at D = 64), so its staging
//                                    and reduction run under them (dense 38.9 against 40.4 ms),
//                                    else after them,
//   dQ staged scaled in shared memory (DqTileLayout: fragments as the threads hold them) and
//   added to the tiled fp32 accumulator by one TMA bulk reduction a half (16 KB), issued by
//   one thread a warpgroup. Per-thread red.global.add took 37% of the pass at 5% kept and 26%
//   dense, the L2 85% busy with them (H200, bench/results/backward-v3-20261204); the bulk
//   reductions cost 13% and 17%. Their source is dead once read: a staging buffer of its own,
//   or (the 64-key CTA at D = 128, two an SM, no room) the step's dO and Q buffers, which the
//   next prefetch then waits for (issued mid-step, after the reductions' reads).
// Padded keys get P = 0 by a mask, padded rows by lse_log2 = +inf and zero-filled dO, so
// partial tiles contribute exactly nothing; an empty walk writes exact zeros.
//
// Registers: dK and dV take 2 x HEAD_DIM / 2 floats a thread, S^T and dP^T 64 more; dQ is done
// in 64-dim halves after S^T and dP^T are dead so that D = 128 stays under 255 (two CTAs an SM
// for one tile; one of 8 warps for two, whose D = 128 shared memory allows no second).
//
// Template instances are listed by pysparse_attn/backends/cupy.py (BACKWARD_SM90_INSTANCES)
// and compiled by pysparse_attn/backends/compile_check.py (nvcc, sm_90a).
//
// Timing-only variants (bench/backward_ablation.py; their gradients are wrong by design):
//   PSA_ABLATE_BWD_NO_DQ_REDUCE   dQ computed and staged but not reduced into the accumulator.
//   PSA_ABLATE_BWD_NO_DQ          no dS^T store, barrier, dQ product, staging or reductions.
//   PSA_ABLATE_BWD_NO_LOADS       every step reuses the first step's Q, dO and row statistics.
//   PSA_ABLATE_BWD_CHEAP_EXP      exp2 of P^T replaced by one FMA.
// Schedule variant (bench/backward_ablation.py's SCHEDULES; gradients right, checked there):
//   PSA_BWD_DQ_LAST               dQ's product issued after dV/dK's, as every CTA shape does
//                                 without a staging buffer per warpgroup (the schedule before
//                                 2026-12-04: dense 40.35 against 38.89 ms on an H200).

#include "backward_params.cuh"
#include "backward_tiles.cuh"
#include "backward_tiles_sm90.cuh"
#include "element_types.cuh"
#include "ptx.cuh"
#include "tma.cuh"
#include "warp_specialization.cuh"
#include "tile_masking.cuh"
#include "warpgroup_mma.cuh"

namespace psa {

// The 64-row step of `walk` into buffer `buffer`: Q, dO, and the rows' lse_log2 and delta
// (the first warp, 32 copies of 16 bytes). Commits nothing.
template <class Traits, class Walk>
__device__ __forceinline__ void load_query_step_sm90(const BackwardParams& params,
                                                     const Walk& walk, int batch,
                                                     int kv_head, int buffer,
                                                     unsigned char* base) {
    const int head = walk.head(params, kv_head);
    const int first_row = walk.first_row(params);
    load_tile_async<Traits, 64>(
        reinterpret_cast<unsigned short*>(base + Traits::kQOffset +
                                          buffer * Traits::kQueryTileBytes),
        params.q + batch * params.q_batch_stride + head * params.q_head_stride,
        params.q_row_stride, first_row, params.n_queries);
    load_tile_async<Traits, 64>(
        reinterpret_cast<unsigned short*>(base + Traits::kDOutOffset +
                                          buffer * Traits::kQueryTileBytes),
        params.d_out + batch * params.d_out_batch_stride + head * params.d_out_head_stride,
        params.d_out_row_stride, first_row, params.n_queries);
    if (threadIdx.x < 32) {
        // n_rows_padded covers every row of every forward tile: no bounds check.
        const int which = threadIdx.x >> 4, chunk = threadIdx.x & 15;
        const float* source = (which ? params.delta : params.lse_log2) +
                              ((long long)batch * params.n_heads + head) * params.n_rows_padded +
                              first_row + chunk * 4;
        copy_async_16(shared_address(base + Traits::kRowStatsOffset) +
                          4 * (buffer * 128 + which * 64 + chunk * 4),
                      source, 16);
    }
}

// The register A operands of an asynchronous MMA, kept live (and unmoved) up to this point.
template <int STEPS>
__device__ __forceinline__ void pin_fragments(unsigned (&a)[STEPS][4]) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[s][e]) :: "memory");
}

// The walk of a CTA of KEY_TILES key tiles, and which of them kept its current step.
template <int KEY_TILES>
struct WalkOf {
    using Type = MergedQueryWalk<KEY_TILES>;
    __device__ static __forceinline__ unsigned kept(const Type& walk) { return walk.kept; }
};
template <>
struct WalkOf<1> {
    using Type = QueryWalk;
    __device__ static __forceinline__ unsigned kept(const Type&) { return 1u; }
};

template <class Element, int HEAD_DIM, int KEY_TILES, bool ACCUMULATE_DQ>
__global__ void __launch_bounds__(128 * KEY_TILES, KEY_TILES == 1 ? 2 : 1)
    attention_backward_dkdv_sm90(const __grid_constant__ BackwardParams params) {
    using Traits = BackwardWarpgroupTraits<HEAD_DIM, KEY_TILES>;
    using Walk = typename WalkOf<KEY_TILES>::Type;
    constexpr int kKeys = Traits::kKeys;
    constexpr int kDimBlocks = HEAD_DIM / 8;   // n8 blocks of dK, dV
    constexpr int kDimSteps = HEAD_DIM / 16;   // k16 steps of S^T, dP^T
    constexpr int kQueryBlocks = 8;            // n8 blocks of S^T over a 64-row step
    constexpr int kQuerySteps = 4;             // k16 steps of dV, dK over a 64-row step
    constexpr int kKeySteps = kKeys / 16;      // k16 steps of dQ over the CTA's keys
    constexpr unsigned kKeyPanel = Traits::kKeyPanelBytes;
    constexpr unsigned kQueryPanel = Traits::kQueryPanelBytes;
    constexpr unsigned kK16Rows = 16 * 128;    // 16 rows of a panel: one k16 step, MN-major

    extern __shared__ unsigned char shared_raw[];
    // The swizzle is a function of address bits 4-9: tiles must sit on 1024-byte boundaries.
    const unsigned raw_address = shared_address(shared_raw);
    unsigned char* base =
        shared_raw + ((Traits::kAlignment - (raw_address & (Traits::kAlignment - 1))) &
                      (Traits::kAlignment - 1));
    const unsigned base_address = shared_address(base);
    const unsigned k_address = base_address + Traits::kKOffset;
    const unsigned v_address = base_address + Traits::kVOffset;
    const unsigned ds_address = base_address + Traits::kDsOffset;
    unsigned short* ds_tile = reinterpret_cast<unsigned short*>(base + Traits::kDsOffset);
    const float* row_stats = reinterpret_cast<const float*>(base + Traits::kRowStatsOffset);

    const int kv_head = blockIdx.y, batch = blockIdx.z;
    const int key_tile = blockIdx.x * KEY_TILES;  // the CTA's first
    const int n_key_tiles = KEY_TILES == 1 ? gridDim.x : (params.n_keys + 63) / 64;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int group = KEY_TILES == 1 ? 0 : threadIdx.x >> 7;  // warpgroup: key tile of the CTA
    const int first_key = key_tile * 64;
    const int warp_key = warp * 16;  // = 64 group + 16 (warp % 4)
    const int valid_keys = min(kKeys, params.n_keys - first_key);
    const float scale_log2 = params.scale_log2;
#ifdef PSA_ABLATE_BWD_NO_DQ
    constexpr bool kStoreDs = false;
#else
    constexpr bool kStoreDs = ACCUMULATE_DQ;
#endif
    // Staging dQ in the step's own Q/dO buffer delays the next prefetch to mid-step.
    constexpr bool kPrefetchLate = kStoreDs && Traits::kStagesInStepBuffers;
    // dQ's product goes first where each warpgroup has exactly one half and its own staging,
    // so that the staging and reduction run under dV/dK's products (a warpgroup without a
    // half would put the wgmma under a branch: ptxas serialises them all, C7514).
#ifdef PSA_BWD_DQ_LAST
    constexpr bool kDqFirst = false;
#else
    constexpr bool kDqFirst =
        kStoreDs && !Traits::kStagesInStepBuffers && HEAD_DIM / 64 == KEY_TILES;
#endif
    // One thread a warpgroup issues (and waits for) its bulk reductions.
    const bool elected = (threadIdx.x & 127) == 0;

    load_tile_async<Traits, kKeys>(reinterpret_cast<unsigned short*>(base + Traits::kKOffset),
                                params.k + batch * params.k_batch_stride +
                                    kv_head * params.k_head_stride,
                                params.k_row_stride, first_key, params.n_keys);
    load_tile_async<Traits, kKeys>(reinterpret_cast<unsigned short*>(base + Traits::kVOffset),
                                params.v + batch * params.v_batch_stride +
                                    kv_head * params.v_head_stride,
                                params.v_row_stride, first_key, params.n_keys);
    Walk walk;
    walk.member = 0;
    walk.open(params, batch, kv_head, key_tile, n_key_tiles);
    if (walk.valid(params))
        load_query_step_sm90<Traits>(params, walk, batch, kv_head, 0, base);
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

    // The walk is the same for every thread, but ptxas cannot see that through the list
    // loads; the vote keeps the loop visibly warp-uniform (a wgmma under a condition ptxas
    // thinks divergent gets every wgmma of the kernel serialized, C7520).
    for (int step = 0; __all_sync(0xffffffffu, walk.valid(params)); ++step) {
#ifdef PSA_ABLATE_BWD_NO_LOADS
        const int buffer = 0;
#else
        const int buffer = step & 1;
#endif
        const int head = walk.head(params, kv_head);
        const int first_row = walk.first_row(params);
        Walk next = walk;
        next.advance(params, batch, kv_head, key_tile, n_key_tiles);
        copy_async_wait<0>();
        fence_generic_to_async_shared();
        // This step's tiles have landed for every thread; every wgmma of step - 1 (which read
        // the buffer the prefetch overwrites, and dS^T) has been waited for by its warp.
        __syncthreads();
        // The prefetch overwrites the buffer step - 1 staged its dQ in: with kPrefetchLate it
        // waits for that bulk reduction's reads (mid-step, below).
        const auto prefetch = [&] {
#ifndef PSA_ABLATE_BWD_NO_LOADS
            if (next.valid(params))
                load_query_step_sm90<Traits>(params, next, batch, kv_head, buffer ^ 1, base);
#endif
            copy_async_commit();
        };
        if (!kPrefetchLate) prefetch();

        const unsigned q_address =
            base_address + Traits::kQOffset + buffer * Traits::kQueryTileBytes;
        const unsigned d_out_address =
            base_address + Traits::kDOutOffset + buffer * Traits::kQueryTileBytes;
        // This warpgroup's key tile did not keep the step: P = 0 (nothing of it counts).
        const bool group_kept = (WalkOf<KEY_TILES>::kept(walk) >> group) & 1u;
        const float* lse_step = row_stats + buffer * 128;
        const float* delta_step = lse_step + 64;

        // S^T = K Q^T, then dP^T = V dO^T in a second group: K-major operands, one k16 step
        // per 32 bytes of a 128-byte panel row; this warpgroup's 64 keys start 64 rows (8192
        // bytes) into each K/V panel per group.
        float s[kQueryBlocks][4], dp[kQueryBlocks][4];
        const unsigned group_rows = group * 64 * 128;
        warpgroup_fence();
#pragma unroll
        for (int ks = 0; ks < kDimSteps; ++ks) {
            const unsigned within = (ks & 3) * 32;
            Warpgroup<Element, 64>::ss(
                s, sw128_descriptor(k_address + group_rows + (ks >> 2) * kKeyPanel + within, 16),
                sw128_descriptor(q_address + (ks >> 2) * kQueryPanel + within, 16), ks > 0);
        }
        warpgroup_commit();
#pragma unroll
        for (int ks = 0; ks < kDimSteps; ++ks) {
            const unsigned within = (ks & 3) * 32;
            Warpgroup<Element, 64>::ss(
                dp, sw128_descriptor(v_address + group_rows + (ks >> 2) * kKeyPanel + within, 16),
                sw128_descriptor(d_out_address + (ks >> 2) * kQueryPanel + within, 16), ks > 0);
        }
        warpgroup_commit();
        warpgroup_wait<1>();
        pin_accumulator(s);

        // P^T while dP^T is computed.
#pragma unroll
        for (int nb = 0; nb < kQueryBlocks; ++nb) {
            const float2 lse = *reinterpret_cast<const float2*>(lse_step + nb * 8 + 2 * (lane & 3));
#pragma unroll
            for (int e = 0; e < 4; ++e)
#ifdef PSA_ABLATE_BWD_CHEAP_EXP
                s[nb][e] = key_valid[e >> 1] && group_kept
                               ? fmaf(s[nb][e], scale_log2, (e & 1) ? -lse.y : -lse.x)
                               : 0.f;
#else
                s[nb][e] = key_valid[e >> 1] && group_kept
                               ? fast_exp2(fmaf(s[nb][e], scale_log2, (e & 1) ? -lse.y : -lse.x))
                               : 0.f;
#endif
        }
        unsigned p[kQuerySteps][4];
#pragma unroll
        for (int kstep = 0; kstep < kQuerySteps; ++kstep) {
            p[kstep][0] = Element::pack(s[2 * kstep][0], s[2 * kstep][1]);
            p[kstep][1] = Element::pack(s[2 * kstep][2], s[2 * kstep][3]);
            p[kstep][2] = Element::pack(s[2 * kstep + 1][0], s[2 * kstep + 1][1]);
            p[kstep][3] = Element::pack(s[2 * kstep + 1][2], s[2 * kstep + 1][3]);
        }
        warpgroup_wait<0>();
        pin_accumulator(dp);

        // dS^T = P^T (dP^T - delta), with the fp32 P^T (not its 16-bit copy).
        unsigned ds[kQuerySteps][4];
#pragma unroll
        for (int nb = 0; nb < kQueryBlocks; ++nb) {
            const float2 delta =
                *reinterpret_cast<const float2*>(delta_step + nb * 8 + 2 * (lane & 3));
#pragma unroll
            for (int e = 0; e < 4; ++e)
                dp[nb][e] = s[nb][e] * (dp[nb][e] - ((e & 1) ? delta.y : delta.x));
        }
#pragma unroll
        for (int kstep = 0; kstep < kQuerySteps; ++kstep) {
            ds[kstep][0] = Element::pack(dp[2 * kstep][0], dp[2 * kstep][1]);
            ds[kstep][1] = Element::pack(dp[2 * kstep][2], dp[2 * kstep][3]);
            ds[kstep][2] = Element::pack(dp[2 * kstep + 1][0], dp[2 * kstep + 1][1]);
            ds[kstep][3] = Element::pack(dp[2 * kstep + 1][2], dp[2 * kstep + 1][3]);
        }
        if (kStoreDs) {
            // The A fragments as they are (keys x queries, queries contiguous): fragment j of
            // k16 step ks holds key +8 (j & 1) and queries 16 ks + 8 (j >> 1) + 2 (lane & 3).
            // Eight consecutive keys per store land in eight distinct 16-byte chunks.
#pragma unroll
            for (int kstep = 0; kstep < kQuerySteps; ++kstep)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int key = warp_key + (lane >> 2) + 8 * (j & 1);
                    *reinterpret_cast<unsigned*>(
                        ds_tile + Traits::template tile_offset<kKeys>(key, 2 * kstep + (j >> 1)) +
                        2 * (lane & 3)) = ds[kstep][j];
                }
        }

        // dV += P^T dO and dK += dS^T Q: dO and Q rows are the K dimension here, read MN-major
        // (16 rows of a panel per k16 step, the 64-dim panels kQueryPanel apart).
        const auto issue_key_gradients = [&] {
            warpgroup_fence();
#pragma unroll
            for (int kstep = 0; kstep < kQuerySteps; ++kstep)
                Warpgroup<Element, HEAD_DIM>::rs_transposed_b(
                    dv, p[kstep], sw128_descriptor(d_out_address + kstep * kK16Rows, kQueryPanel));
#pragma unroll
            for (int kstep = 0; kstep < kQuerySteps; ++kstep)
                Warpgroup<Element, HEAD_DIM>::rs_transposed_b(
                    dk, ds[kstep], sw128_descriptor(q_address + kstep * kK16Rows, kQueryPanel));
            warpgroup_commit();
        };
        // dS^T, written by ordinary stores, is read next by the async proxy, by all warps; the
        // bulk reductions that read the buffer this step stages in, or the one the late
        // prefetch fills, are done reading it.
        const auto sync_for_dq = [&] {
            fence_generic_to_async_shared();
            if (elected) bulk_wait_group_read<0>();
            __syncthreads();
            if (kPrefetchLate) prefetch();
        };
        // dQ (64 queries x 64 dims) = dS K for one 64-dim half: A = dS^T and B = K, both
        // key-major.
        const auto issue_dq = [&](float (&dq)[8][4], int half) {
            warpgroup_fence();  // dq's registers were read by the staging of the last half
#pragma unroll
            for (int kstep = 0; kstep < kKeySteps; ++kstep)
                Warpgroup<Element, 64>::ss_transposed(
                    dq, sw128_descriptor(ds_address + kstep * kK16Rows, kKeyPanel),
                    sw128_descriptor(k_address + half * kKeyPanel + kstep * kK16Rows, kKeyPanel),
                    kstep > 0);
            warpgroup_commit();
        };
        // The finished half, scaled, staged (DqTileLayout) and added by one bulk reduction.
        const auto stage_and_reduce = [&](const float (&dq)[8][4], int half) {
            unsigned char* staging =
                Traits::kStagesInStepBuffers
                    ? base + (half == 0 ? Traits::kDOutOffset : Traits::kQOffset) +
                          buffer * Traits::kQueryTileBytes
                    : base + Traits::kStagingOffset + half * DqTileLayout::kHalfBytes;
            float* const staged = reinterpret_cast<float*>(staging);
            const int thread = threadIdx.x & 127;
#pragma unroll
            for (int chunk = 0; chunk < 8; ++chunk)
                *reinterpret_cast<float4*>(staged + DqTileLayout::offset(0, chunk, thread)) =
                    make_float4(dq[chunk][0] * params.scale, dq[chunk][1] * params.scale,
                                dq[chunk][2] * params.scale, dq[chunk][3] * params.scale);
            fence_generic_to_async_shared();
            if (group == 0)
                named_barrier_sync<1>(128);
            else
                named_barrier_sync<2>(128);
#ifndef PSA_ABLATE_BWD_NO_DQ_REDUCE
            if (elected) {
                float* const step_tile =
                    params.dq_accumulator +
                    (((long long)batch * params.n_heads + head) * params.n_rows_padded +
                     first_row) * HEAD_DIM;
                bulk_reduce_add_f32(step_tile + DqTileLayout::offset(half, 0, 0),
                                    shared_address(staging), DqTileLayout::kHalfBytes);
                bulk_commit_group();
            }
#endif
        };

        if (kDqFirst) {
            // One half a warpgroup (half `group`), staged in a buffer of its own: its product
            // goes first, so that its staging and reduction run under dV/dK's.
            sync_for_dq();
            float dq[8][4];
            issue_dq(dq, group);
            issue_key_gradients();
            warpgroup_wait<1>();
            pin_accumulator(dq);
            stage_and_reduce(dq, group);
        } else {
            issue_key_gradients();
            if (kStoreDs) {
                sync_for_dq();
#pragma unroll
                for (int half = 0; half < HEAD_DIM / 64; ++half) {
                    // The vote keeps the warpgroup's branch visibly warp-uniform (C7520).
                    if (KEY_TILES > 1 && !__all_sync(0xffffffffu, half % KEY_TILES == group))
                        continue;
                    float dq[8][4];
                    issue_dq(dq, half);
                    // Also waits for dV/dK's products: this step's Q and dO are dead after it.
                    warpgroup_wait<0>();
                    pin_accumulator(dq);
                    stage_and_reduce(dq, half);
                }
            }
        }
        // dK/dV's wgmma read p, ds and this step's Q/dO buffer: done before either changes.
        // Pinning the fragments keeps their registers from being reused while in flight.
        warpgroup_wait<0>();
        pin_accumulator(dk);
        pin_accumulator(dv);
        pin_fragments(p);
        pin_fragments(ds);
        walk = next;
    }
    copy_async_wait<0>();
    // The staging is shared memory: read out before the CTA exits.
    if (kStoreDs && elected) bulk_wait_group<0>();

    store_key_gradients<Element, HEAD_DIM>(params, (long long)batch * gridDim.y + kv_head,
                                           first_key + warp_key, lane, dk, dv);
}

}  // namespace psa
