// Warp-specialised fused sparse attention forward for Hopper (sm_90a), docs/design.rst sections 4-5.
//
// Same contract, ForwardParams, plan row, skip rules, vote semantics and epilogue as
// attention_forward_sm90.cu (forward_common.cuh, online_softmax.cuh); what changes is who
// moves the data and how the warps meet. One CTA per (query tile, head, batch):
//
// - warpgroup 0 produces: its warp 0 loads Q once and then every visited K tile, K_STAGES
//   ahead, with TMA bulk tensor copies completing on mbarriers; its warp 1 loads V, into a
//   separate V_STAGES ring, for kept tiles only. With a skip rule, warp 1 waits for the
//   consumers' vote on each tile before fetching its V (and records the statistics bitmaps),
//   so a skipped tile costs its K load and Q.K^T and nothing else. The producer gives its
//   registers to the consumers (setmaxnreg).
// - warpgroups 1 .. BLOCK_Q / 64 consume, 64 query rows each, with no CTA-wide barrier in the
//   loop: per tile, wait for K, issue S = Q.K^T (wgmma), issue the previous kept tile's P.V
//   (it runs while this tile's softmax is computed), vote, softmax, release the stages. With a
//   skip rule (128-row tiles) Q.K^T runs one tile ahead instead: at tile j, S_(j+1) and the
//   previous P.V are issued before tile j is reduced, voted on and exponentiated. Two
//   consumers (128-row tiles) take turns issuing their wgmmas (ping-pong, named barriers):
//   one warpgroup's softmax runs under the other's GEMMs.
//
// The skip vote stays per query tile (a tile is skipped only when every valid row of the CTA
// may skip it): each consumer warpgroup reduces its rows with a named barrier of its own 128
// threads and posts its vote to a per-stage slot and mbarrier. A warpgroup whose rows keep the
// tile knows the CTA keeps it and goes on at once; only one that would skip waits for the
// others' votes.
//
// Stage protocol, stage s of round r (r-th use of s): k_full[s] phase r completes when the K
// bytes land; k_empty[s] when every consumer warp finished its Q.K^T (and, with a skip rule,
// the V producer read the decision): only then is the stage refilled, which also makes the vote
// slots of s free again. v_full / v_empty likewise, counted in kept tiles. Every wait is
// bounded (mbarrier.cuh).
//
// Template instances are listed by pysparse_attn/backends/cupy.py (FORWARD_SM90_WS_INSTANCES,
// from SM90_WS_CONFIGS) and compiled by pysparse_attn/backends/compile_check.py.
//
// Schedule variants for same-run comparisons (bench/forward_ablation.py --mode schedule and
// --mode rule-cost; the shipped choices and their measurements are at kPipelinedScores and
// kPingPong): PSA_WS_SERIAL_SCORES, PSA_WS_NO_PINGPONG, and PSA_WS_PIPELINED_ALWAYS (the
// pipelined scores without a rule too, without ping-pong). Timing-only variants of the rule
// kernels (where a rule skips, their results differ from the shipped kernel's by design):
//   PSA_WS_ABLATE_NO_DECISION  the rule's tile mass and predicate are computed, but nothing is
//       voted or skipped: no vote slots, no `decided` barrier, V loaded ahead as without a
//       rule. The shipped kernel minus this is what the decision costs.
//   PSA_WS_ABLATE_WARP_VOTE    each warp decides by __all_sync instead of the warpgroup's
//       named-barrier reduction (bar.red): the reduction's share of that cost. Only for rules
//       that skip nothing: where the warps of a warpgroup disagreed, its wgmmas would diverge.

#include "element_types.cuh"
#include "forward_common.cuh"
#include "forward_params.cuh"
#include "mbarrier.cuh"
#include "online_softmax.cuh"
#include "ptx.cuh"
#include "skip_rules.cuh"
#include "tile_masking.cuh"
#include "tile_traits_sm90.cuh"
#include "tma.cuh"
#include "warp_specialization.cuh"
#include "warpgroup_mma.cuh"

namespace psa {

// The kernel's one parameter: the three tensor maps, then the common forward parameters. The
// host image is cupy.py's _WS_PARAMS_DTYPE (same fields, same offsets, padded to 64 bytes).
struct alignas(64) WarpSpecializedParams {
    TensorMap q_map;  // box 64 x BLOCK_Q
    TensorMap k_map;  // box 64 x 64
    TensorMap v_map;  // box 64 x 64
    ForwardParams base;
};

// Registers per thread once the producer hands its share to the consumers. 128-row tiles: the
// launch bound (384 threads, one CTA an SM) starts every thread at 168; the producer keeps 24,
// each consumer thread gets 240 (24 + 2 x 240 = 3 x 168). 64-row tiles (256 threads) start at
// the 255 maximum, so there is nothing to move: kSplit is false. (Two 64-row CTAs an SM, 128
// registers each, spilled 200-400 bytes a thread even with 232 for the consumer.)
template <int BLOCK_Q>
struct RegisterSplit {
    static constexpr bool kSplit = BLOCK_Q == 128;
    static constexpr int kProducer = 24;
    static constexpr int kConsumer = 240;
};

template <class Element, int HEAD_DIM, int BLOCK_Q, int K_STAGES, int V_STAGES, class Rule>
__global__ void __launch_bounds__(128 * (1 + BLOCK_Q / 64), 1)
    attention_forward_sm90_ws(const __grid_constant__ WarpSpecializedParams params) {
    using Traits = WarpSpecializedTraits<HEAD_DIM, BLOCK_Q, K_STAGES, V_STAGES>;
    constexpr int kConsumers = Traits::kConsumers;
    constexpr int kKeyBlocks = Traits::kKeyBlocks;
    constexpr int kDimBlocks = Traits::kDimBlocks;
    constexpr int kBlockK = Traits::kBlockK;
    // Whether tiles are voted on and skipped (a rule that can skip, unless ablated).
#ifdef PSA_WS_ABLATE_NO_DECISION
    constexpr bool kDecides = false;
#else
    constexpr bool kDecides = Rule::kCanSkip;
#endif
    // Consumer warps arrive on k_empty; with a skip rule, so does the V producer (decision
    // read), which keeps a stage's vote slots and `decided` phase from being reused early.
    constexpr unsigned kKEmptyArrivals = 4 * kConsumers + (kDecides ? 1 : 0);

    extern __shared__ unsigned char shared_raw[];
    const unsigned raw_address = shared_address(shared_raw);
    const unsigned padding = (Traits::kAlignment - (raw_address & (Traits::kAlignment - 1))) &
                             (Traits::kAlignment - 1);
    unsigned char* shared = shared_raw + padding;
    const unsigned base = raw_address + padding;
    const unsigned q_tile = base;
    const unsigned k_tiles = base + Traits::kKOffset;
    const unsigned v_tiles = base + Traits::kVOffset;
    const unsigned barriers = base + Traits::kBarrierOffset;
    const unsigned q_full = barriers;
    auto k_full = [&](int stage) { return barriers + 8u * (1 + stage); };
    auto k_empty = [&](int stage) { return barriers + 8u * (1 + K_STAGES + stage); };
    auto decided = [&](int stage) { return barriers + 8u * (1 + 2 * K_STAGES + stage); };
    auto v_full = [&](int stage) { return barriers + 8u * (1 + 3 * K_STAGES + stage); };
    auto v_empty = [&](int stage) {
        return barriers + 8u * (1 + 3 * K_STAGES + V_STAGES + stage);
    };
    // votes[stage * kConsumers + consumer]: 1 when all of that warpgroup's rows may skip.
    volatile int* votes = reinterpret_cast<volatile int*>(shared + Traits::kVoteOffset);

    const ForwardParams& common = params.base;
    const int query_tile = blockIdx.x;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int kv_head = head / common.head_group;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int n_keys = common.n_keys;
    const int n_key_tiles = (n_keys + kBlockK - 1) / kBlockK;
    const PlanRow plan = plan_row(common, batch, head, query_tile, gridDim.y, gridDim.x,
                                  n_key_tiles);
    const int n_visit = plan.count;
    const int first_query = query_tile * BLOCK_Q;

    if (threadIdx.x == 0) {
        // The host computed the layout's size from the same table; a mismatch must not
        // silently overrun shared memory.
        if (dynamic_shared_bytes() < Traits::kSharedBytes) __trap();
        mbarrier_init(q_full, 1);
        for (int s = 0; s < K_STAGES; ++s) {
            mbarrier_init(k_full(s), 1);
            mbarrier_init(k_empty(s), kKEmptyArrivals);
            mbarrier_init(decided(s), kConsumers);
        }
        for (int s = 0; s < V_STAGES; ++s) {
            mbarrier_init(v_full(s), 1);
            mbarrier_init(v_empty(s), 4 * kConsumers);
        }
        mbarrier_init_fence();
    }
    __syncthreads();  // the only CTA-wide barrier: barriers initialised before any use

    if (warp < 4) {
        // ---------------- producer warpgroup ----------------
        if (RegisterSplit<BLOCK_Q>::kSplit)
            warpgroup_release_registers<RegisterSplit<BLOCK_Q>::kProducer>();
        if (warp == 0 && lane == 0 && n_visit > 0) {
            tensor_map_prefetch(params.q_map);
            tensor_map_prefetch(params.k_map);
            mbarrier_arrive_expect_bytes(q_full, Traits::kQBytes);
#pragma unroll
            for (int panel = 0; panel < Traits::kPanels; ++panel)
                tma_load_4d(q_tile + panel * Traits::kQPanelBytes, params.q_map, q_full,
                            64 * panel, first_query, head, batch);
            for (int step = 0; step < n_visit; ++step) {
                const int stage = step % K_STAGES, round = step / K_STAGES;
                if (round > 0) mbarrier_wait(k_empty(stage), (round - 1) & 1);
                const unsigned destination = k_tiles + stage * Traits::kKvBytes;
                mbarrier_arrive_expect_bytes(k_full(stage), Traits::kKvBytes);
                const int key_row = plan.tiles[step] * kBlockK;
#pragma unroll
                for (int panel = 0; panel < Traits::kPanels; ++panel)
                    tma_load_4d(destination + panel * Traits::kKvPanelBytes, params.k_map,
                                k_full(stage), 64 * panel, key_row, kv_head, batch);
            }
        } else if (warp == 1 && lane == 0 && n_visit > 0) {
            tensor_map_prefetch(params.v_map);
            int kept_count = 0;
            for (int step = 0; step < n_visit; ++step) {
                const int stage = step % K_STAGES, round = step / K_STAGES;
                const int key_tile = plan.tiles[step];
                bool keep = true;
                if (kDecides) {
                    mbarrier_wait(decided(stage), round & 1);
                    bool all_skip = step > 0;
#pragma unroll
                    for (int c = 0; c < kConsumers; ++c)
                        all_skip &= votes[stage * kConsumers + c] != 0;
                    keep = !all_skip;
                    mbarrier_arrive(k_empty(stage));
                }
                if (common.want_stats) {
                    common.visited[plan.stats_row + key_tile] = 1;
                    if (keep) common.kept[plan.stats_row + key_tile] = 1;
                }
                if (!keep) continue;
                const int v_stage = kept_count % V_STAGES, v_round = kept_count / V_STAGES;
                ++kept_count;
                if (v_round > 0) mbarrier_wait(v_empty(v_stage), (v_round - 1) & 1);
                const unsigned destination = v_tiles + v_stage * Traits::kKvBytes;
                mbarrier_arrive_expect_bytes(v_full(v_stage), Traits::kKvBytes);
#pragma unroll
                for (int panel = 0; panel < Traits::kPanels; ++panel)
                    tma_load_4d(destination + panel * Traits::kKvPanelBytes, params.v_map,
                                v_full(v_stage), 64 * panel, key_tile * kBlockK, kv_head, batch);
            }
        }
        return;
    }

    // ---------------- consumer warpgroups ----------------
    if (RegisterSplit<BLOCK_Q>::kSplit)
        warpgroup_claim_registers<RegisterSplit<BLOCK_Q>::kConsumer>();
    const int consumer = warp / 4 - 1;
    // Named barriers (0 is __syncthreads): 1 + consumer for a warpgroup's vote, kTurnBarrier +
    // consumer for the ping-pong hand-off to that consumer.
    constexpr unsigned kTurnBarrier = 1 + kConsumers;
    const int warp_row = 64 * consumer + 16 * (warp & 3);  // this warp's 16 rows in the tile
    const BoundRule<Rule, Log2Units, float> rule(common.rule_params, head);
    const float scale_log2 = common.scale_log2;

    bool row_valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
        row_valid[r] = first_query + warp_row + (lane >> 2) + 8 * r < common.n_queries;

    float o[kDimBlocks][4];
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[db][e] = 0.f;
    RowState state;
    state.init();
    unsigned p[Traits::kKeySteps][4];
    // Q is read from shared memory by every Q.K^T: keeping it in registers (as the sm90
    // kernel does at D = 128) spilled 32 bytes a thread at 240 registers.
    constexpr bool kQInRegisters = false;
    unsigned q_fragments[kQInRegisters ? Traits::kDimSteps : 1][4];
    const unsigned q_base = q_tile + consumer * 64 * 128;
    bool pv_pending = false;  // CTA-uniform: the decision is the CTA's
    int pv_stage = 0, pv_round = 0, kept_count = 0;

    auto issue_pv = [&]() {
        mbarrier_wait(v_full(pv_stage), pv_round & 1);
        const unsigned v_stage = v_tiles + pv_stage * Traits::kKvBytes;
        warpgroup_fence();
#pragma unroll
        for (int kstep = 0; kstep < Traits::kKeySteps; ++kstep)
            Warpgroup<Element, HEAD_DIM>::rs_transposed_b(
                o, p[kstep], sw128_descriptor(v_stage + kstep * 16 * 128, Traits::kKvPanelBytes));
    };
    auto release = [&](unsigned barrier) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(barrier);
    };

    if (n_visit > 0) {
        mbarrier_wait(q_full, 0);
        if (kQInRegisters) {
#pragma unroll
            for (int ks = 0; ks < Traits::kDimSteps; ++ks)
                load_matrix_x4(q_fragments[kQInRegisters ? ks : 0],
                               q_tile + 2 * Traits::template tile_offset<BLOCK_Q>(
                                            warp_row + (lane & 15), ks * 2 + (lane >> 4)));
        }
    }

    // S = Q.K^T of visit `step` into `scores`, once its K stage has landed (not committed).
    auto issue_scores = [&](float (&scores)[kKeyBlocks][4], int step) {
        mbarrier_wait(k_full(step % K_STAGES), (step / K_STAGES) & 1);
        const unsigned k_stage = k_tiles + (step % K_STAGES) * Traits::kKvBytes;
        warpgroup_fence();
        pin_accumulator(scores);
#pragma unroll
        for (int ks = 0; ks < Traits::kDimSteps; ++ks) {
            const unsigned panel = ks >> 2, within = (ks & 3) * 32;
            const unsigned long long k_descriptor =
                sw128_descriptor(k_stage + panel * Traits::kKvPanelBytes + within, 16);
            if (kQInRegisters)
                Warpgroup<Element, kBlockK>::rs(scores, q_fragments[kQInRegisters ? ks : 0],
                                                k_descriptor, ks > 0);
            else
                Warpgroup<Element, kBlockK>::ss(
                    scores, sw128_descriptor(q_base + panel * Traits::kQPanelBytes + within, 16),
                    k_descriptor, ks > 0);
        }
    };

    // With a skip rule, Q.K^T runs one visit ahead (kPipelinedScores): tile j + 1's scores are
    // computed while tile j is reduced, voted on and exponentiated, so a skipped tile's
    // reduction and vote (its whole cost besides Q.K^T) run under the tensor cores. It needs a
    // second score buffer's registers, which the 128-row CTA has from setmaxnreg. Measured on an
    // H200 (bench/results/forward-schedule-20261203): 7-12% faster than the serial schedule at
    // 90-97% of tiles skipped, 0-5% faster when nothing is skipped, but 2% slower dense and on
    // TopK plans (its visit is inlined in four copies, see `visit`), so kernels without a rule,
    // and the 64-row instances (where it compiled to serialised wgmma, ptxas C7520), keep the
    // serial schedule: Q.K^T of tile j issued at visit j. PSA_WS_SERIAL_SCORES selects the
    // serial schedule everywhere for same-run comparisons (bench/forward_ablation.py --mode
    // schedule); both run the same arithmetic.
#if defined(PSA_WS_SERIAL_SCORES)
    constexpr bool kPipelinedScores = false;
#elif defined(PSA_WS_PIPELINED_ALWAYS)
    constexpr bool kPipelinedScores = RegisterSplit<BLOCK_Q>::kSplit;
#else
    constexpr bool kPipelinedScores = RegisterSplit<BLOCK_Q>::kSplit && Rule::kCanSkip;
#endif
    // Two score buffers, alternating every visit (the pipelined loop runs visits in pairs);
    // copying the next scores into place instead measured no faster where rules skip.
    float scores_a[kKeyBlocks][4], scores_b[kKeyBlocks][4];
    if (kPipelinedScores && n_visit > 0) {
        pin_accumulator(o);
        issue_scores(scores_a, 0);
        warpgroup_commit();
        warpgroup_wait<0>();
        pin_accumulator(scores_a);
    }

    // One visit: `s` holds (pipelined) or receives (serial) this tile's scores; with pipelined
    // scores the next tile's go to `s_next` when `has_next`. `pv_issued`: the previous kept
    // tile's P.V is issued here. In the pipelined schedule both flags are literals at every call
    // (visit_either and the loop below), so each inlined copy issues its wgmmas unconditionally
    // and the run-time branches fall between visits, when no wgmma is in flight: with either
    // wgmma under a run-time condition, ptxas serialised every wgmma of the kernel (C7515,
    // nvcc 13.0). The serial schedule's conditional P.V does not trip it.
    //
    // Ping-pong (two consumers): left alone, both warpgroups drift into step, exponentiating at
    // the same time while the tensor cores idle. So they take turns issuing their visit's
    // wgmmas: turn 2 * step + consumer starts when turn 2 * step + consumer - 1 has issued
    // (named barrier, both warpgroups' 256 threads: the waiter syncs, the issuer arrives), so
    // consumer 1 runs half a visit behind consumer 0. Every visit is taken by both consumers
    // (the skip decision is the CTA's), so turns match. The hand-offs inside the visit are
    // unconditional: under a run-time condition (first or last turn) ptxas serialised every
    // wgmma of the kernel (C7520, nvcc 13.0). So consumer 1 hands consumer 0 its first turn
    // before the loop, and consumer 0 takes the hand-off of consumer 1's last turn after it:
    // no arrival is left unmatched when the CTA exits. Kernels with a skip rule do not take
    // turns: a warpgroup voting to skip waits on the other's vote, which ping-pong holds half a
    // visit back, so where rules skip 90-97% of tiles it measured 3-5% slower (and 2% faster
    // where they skip nothing; bench/results/forward-pingpong-20261203). PSA_WS_NO_PINGPONG
    // turns it off everywhere for same-run comparisons.
#if defined(PSA_WS_NO_PINGPONG) || defined(PSA_WS_PIPELINED_ALWAYS)
    constexpr bool kPingPong = false;
#else
    constexpr bool kPingPong = kConsumers == 2 && !Rule::kCanSkip;
#endif
    auto visit = [&](float (&s)[kKeyBlocks][4], float (&s_next)[kKeyBlocks][4], int step,
                     const bool pv_issued, const bool has_next) {
        const int key_tile = plan.tiles[step];
        const int stage = step % K_STAGES, round = step / K_STAGES;
        if (kPingPong) named_barrier_sync(kTurnBarrier + consumer, 128 * kConsumers);
        pin_accumulator(o);
        if (kPipelinedScores) {
            if (has_next) issue_scores(s_next, step + 1);
        } else {
            issue_scores(s, step);
        }
        warpgroup_commit();
        // The previous kept tile's P.V runs on the tensor cores during this tile's softmax.
        if (pv_issued) issue_pv();
        warpgroup_commit();
        if (kPingPong) named_barrier_arrive(kTurnBarrier + (consumer ^ 1), 128 * kConsumers);
        if (!kPipelinedScores) {
            warpgroup_wait<1>();  // this tile's scores
            pin_accumulator(s);
        }

        const int valid_keys = min(kBlockK, n_keys - key_tile * kBlockK);
        if (valid_keys < kBlockK) mask_padded_keys(s, valid_keys, lane);
        float tile_max2[2];
        tile_row_max(s, tile_max2);
#pragma unroll
        for (int r = 0; r < 2; ++r) tile_max2[r] *= scale_log2;  // scale > 0: max commutes

        bool skip = false;
        if (Rule::kCanSkip && !kDecides) {  // PSA_WS_ABLATE_NO_DECISION: computed, not used
            float added[2];
            tile_skipped_mass<Rule>(s, tile_max2, scale_log2, state, valid_keys, added);
            const bool may_skip = rows_may_skip(rule, state, tile_max2, added, row_valid);
            asm volatile("" :: "r"(static_cast<unsigned>(may_skip)));
        }
        if (kDecides) {
            float added[2];
            tile_skipped_mass<Rule>(s, tile_max2, scale_log2, state, valid_keys, added);
#ifdef PSA_WS_ABLATE_WARP_VOTE
            const bool rows_skip = step > 0 && __all_sync(
                0xffffffffu, rows_may_skip(rule, state, tile_max2, added, row_valid));
#else
            const bool rows_skip = step > 0 && warpgroup_all(
                rows_may_skip(rule, state, tile_max2, added, row_valid), 1 + consumer);
#endif
            if ((threadIdx.x & 127) == 0) {
                votes[stage * kConsumers + consumer] = rows_skip;
                mbarrier_arrive(decided(stage));
            }
            skip = rows_skip;
            if (kConsumers > 1 && rows_skip) {
                mbarrier_wait(decided(stage), round & 1);
#pragma unroll
                for (int c = 0; c < kConsumers; ++c) skip &= votes[stage * kConsumers + c] != 0;
            }
            if (skip) add_skipped_mass(state, added);
        }
        // This tile's Q.K^T has read its K stage and the decision is known.
        release(k_empty(stage));

        float alpha[2];
        if (!skip) softmax_tile<Rule::kNeedsRowSum>(s, tile_max2, scale_log2, state, alpha);
        // The previous P.V has to finish before O is rescaled and p is overwritten (and, with
        // pipelined scores, the next tile's Q.K^T before its registers are read).
        warpgroup_wait<0>();
        pin_accumulator(o);
        if (kPipelinedScores) pin_accumulator(s_next);
        if (pv_issued) release(v_empty(pv_stage));
        pv_pending = !skip;
        if (skip) return;
        rescale_output(o, alpha);
        pv_stage = kept_count % V_STAGES;
        pv_round = kept_count / V_STAGES;
        ++kept_count;
#pragma unroll
        for (int kstep = 0; kstep < Traits::kKeySteps; ++kstep) {
            p[kstep][0] = Element::pack(s[2 * kstep][0], s[2 * kstep][1]);
            p[kstep][1] = Element::pack(s[2 * kstep][2], s[2 * kstep][3]);
            p[kstep][2] = Element::pack(s[2 * kstep + 1][0], s[2 * kstep + 1][1]);
            p[kstep][3] = Element::pack(s[2 * kstep + 1][2], s[2 * kstep + 1][3]);
        }
    };
    auto visit_either = [&](float (&s)[kKeyBlocks][4], float (&s_next)[kKeyBlocks][4], int step,
                            const bool has_next) {
        if (__all_sync(0xffffffffu, pv_pending))
            visit(s, s_next, step, true, has_next);
        else
            visit(s, s_next, step, false, has_next);
    };
    if (kPingPong && consumer == 1 && n_visit > 0)
        named_barrier_arrive(kTurnBarrier, 128 * kConsumers);
    if (!kPipelinedScores) {
        // The serial schedule: one visit an iteration, the P.V under a run-time condition.
        for (int step = 0; step < n_visit; ++step)
            visit(scores_a, scores_a, step, __all_sync(0xffffffffu, pv_pending), false);
    } else {
        // Visits in pairs (the score buffers alternate), the last one or two apart (no next
        // tile).
        int step = 0;
        for (; step + 2 < n_visit; step += 2) {
            visit_either(scores_a, scores_b, step, true);
            visit_either(scores_b, scores_a, step + 1, true);
        }
        if (step + 1 < n_visit) {
            visit_either(scores_a, scores_b, step, true);
            visit_either(scores_b, scores_a, step + 1, false);
        } else if (step < n_visit) {
            visit_either(scores_a, scores_b, step, false);
        }
    }
    if (kPingPong && consumer == 0 && n_visit > 0)
        named_barrier_sync(kTurnBarrier, 128 * kConsumers);
    if (__all_sync(0xffffffffu, pv_pending)) {
        pin_accumulator(o);
        issue_pv();
        warpgroup_commit();
        warpgroup_wait<0>();
        pin_accumulator(o);
    }

    store_rows<Element, Rule::kNeedsRowSum>(common, o, state, row_valid,
                                            first_query + warp_row + (lane >> 2), batch, head,
                                            gridDim.y, n_visit == 0, lane);
}

}  // namespace psa
