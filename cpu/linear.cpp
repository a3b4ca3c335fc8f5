// The SLA linear branch and its gradient (docs/design.rst section 6):
// O_l,i = phi(q_i) H_I / (phi(q_i) . Z_I + eps), H_I = sum_{J marginal} phi(K_J)^T V_J,
// Z_I = sum_{J marginal} phi(K_J)^T 1.
//
// One (batch, kv head) at a time: per key tile the D x D summary phi(K_J)^T V_J is formed once
// (one task per key tile); each query tile of the head group then sums the summaries of its
// marginal tiles directly, which is O(nq nk D^2) against the sparse branch's O(N^2 D) and
// agrees with the float64 direct sum within float32 rounding. The backward runs the same steps
// in reverse: per query tile dH_I and dZ_I, then per key tile the sum of dH_I over the query
// tiles (and GQA heads) that marked it marginal. The sums run for blocks of up to kMaxBlock
// tiles at once (gather_block), each summary read once per block, in the order a tile at a
// time would add them (each block's sums are one gemm of a 0/1 matrix with the stacked
// summaries). Holding the summaries of one kv head only keeps the extra memory at
// nk D^2 (+ group nq D^2 in the backward) floats, plus kMaxBlock D^2 a thread: 8 MB at
// N = 32k, D = 128, where all heads at once would take hundreds of MB. All products are the
// gemm.
#include <cmath>
#include <vector>

#include "dispatch.hpp"
#include "feature_map.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "openmp.hpp"
#include "simd.hpp"
#include "strided.hpp"

namespace psa {
namespace {

template <typename T>
struct LinearWorkspace {
    int64_t d_pad, rows_pad;
    std::vector<T> x, phi, phi_t, v, h_t, num, d_num, d_phi, dx, d_den;
    // The summed states of a task's tiles (gather_block): (tiles, D, d_pad) and (tiles, d_pad),
    // the 0/1 weights that select them, (tiles, sources), and whether each tile had anything
    // to sum. h, z: the current tile's (select).
    std::vector<T> h_block, z_block, weights;
    std::vector<char> any_block;
    T* h = nullptr;
    T* z = nullptr;

    LinearWorkspace(int64_t block, int64_t dim, int64_t tiles, int64_t sources)
        : d_pad(round_up_lanes<T>(dim)), rows_pad(round_up_lanes<T>(block)),
          x(block * d_pad), phi(block * d_pad), phi_t(dim * rows_pad), v(block * d_pad),
          h_t(dim * d_pad), num(block * d_pad), d_num(block * d_pad), d_phi(block * d_pad),
          dx(block * d_pad), d_den(block), h_block(tiles * dim * d_pad), z_block(tiles * d_pad),
          weights(tiles * sources), any_block(tiles) {}

    // Point h and z at tile i of the block; whether it had anything to sum.
    bool select(int64_t i, int64_t dim) {
        h = h_block.data() + i * dim * d_pad;
        z = z_block.data() + i * d_pad;
        return any_block[i] != 0;
    }
};

// Tiles per task of the gathers: a gather is the product of a (tiles x sources) 0/1 matrix
// with the stacked states, so a task of kMicroRows tiles reads each source once, in the gemm's
// registers; fewer where that leaves under four tasks a thread.
constexpr int64_t kMaxBlock = kMicroRows;
inline int64_t tiles_per_task(int64_t tiles, int threads) {
    return std::max<int64_t>(1, std::min<int64_t>(kMaxBlock, tiles / (4 * int64_t(threads))));
}

template <typename In, typename T>
struct Linear {
    const LinearArgs& a;
    Strided<In> q, k, v;
    int64_t D, dp, Bq, Bk, nq, nk, group;
    // Of the current (batch, kv head) only:
    std::vector<T> tile_h;    // (nk, D, dp): phi(K_J)^T V_J
    std::vector<T> tile_z;    // (nk, dp): phi(K_J)^T 1
    std::vector<T> query_dh;  // backward: (group, nq, D, dp) dH_I of the group's query heads
    std::vector<T> query_dz;  // backward: (group, nq, dp) dZ_I

    explicit Linear(const LinearArgs& args)
        : a(args), q(strided<In>(args.q)), k(strided<In>(args.k)), v(strided<In>(args.v)),
          D(args.shape.dim), dp(round_up_lanes<T>(D)), Bq(args.shape.block_q),
          Bk(args.shape.block_k), nq(tile_count(args.shape.q_len, Bq)),
          nk(tile_count(args.shape.kv_len, Bk)),
          group(args.shape.q_heads / args.shape.kv_heads), tile_h(nk * D * dp),
          tile_z(nk * dp) {}

    int threads() const { return thread_count(a.shape.threads); }

    bool is_marginal(int64_t b, int64_t h, int64_t qt, int64_t kt) const {
        return a.marginal[((b * a.shape.q_heads + h) * nq + qt) * nk + kt] != 0;
    }

    // The same for query tile `slot` of kv head hk's group: (h % group) * nq + qt.
    bool slot_marks(int64_t b, int64_t hk, int64_t slot, int64_t kt) const {
        return is_marginal(b, hk * group + slot / nq, slot % nq, kt);
    }

    // phi of `rows` rows of x (b, h, row0..) into ws.phi, keeping the raw rows in ws.x.
    void load_features(LinearWorkspace<T>& ws, const Strided<In>& x, int64_t b, int64_t h,
                       int64_t row0, int64_t rows) {
        load_rows(x, b, h, row0, rows, D, T(1), ws.x.data(), dp);
        for (int64_t r = 0; r < rows; ++r)
            feature_map_row(a.feature_map, ws.x.data() + r * dp, ws.phi.data() + r * dp, D);
    }

    // phi(K_J)^T V_J and phi(K_J)^T 1 of every key tile of kv head (b, hk).
    void key_summaries(std::vector<LinearWorkspace<T>>& workspaces, int64_t b, int64_t hk) {
        const Shape& sh = a.shape;
        std::fill(tile_z.begin(), tile_z.end(), T(0));
#pragma omp parallel for num_threads(threads()) schedule(dynamic, 1)
        for (int64_t kt = 0; kt < nk; ++kt) {
            LinearWorkspace<T>& ws = workspaces[thread_index()];
            const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
            load_features(ws, k, b, hk, key0, keys);
            load_rows(v, b, hk, key0, keys, D, T(1), ws.v.data(), dp);
            transpose(keys, D, ws.phi.data(), dp, ws.phi_t.data(), ws.rows_pad);
            gemm<T, false>(D, dp, keys, ws.phi_t.data(), ws.rows_pad, ws.v.data(), dp,
                           tile_h.data() + kt * D * dp, dp);
            T* z = tile_z.data() + kt * dp;
            for (int64_t r = 0; r < keys; ++r)
                for (int64_t d = 0; d < D; ++d) z[d] += ws.phi[r * dp + d];
        }
    }

    // For tiles i < count of a task: h_block[i] = the sum of the (D, dp) states src_h[j] and
    // z_block[i] of the (dp) src_z[j] over the sources j < sources that marked(i, j) selects,
    // as one product W S of the 0/1 weights with the stacked states. The gemm adds in
    // increasing j and a weight of 0 adds an exact 0, so the sums are those of adding the
    // selected states one by one (the states are finite).
    template <typename Marked>
    void gather_block(LinearWorkspace<T>& ws, int64_t count, int64_t sources, const T* src_h,
                      const T* src_z, Marked marked) const {
        T* weights = ws.weights.data();
        for (int64_t i = 0; i < count; ++i) {
            bool any = false;
            for (int64_t j = 0; j < sources; ++j) {
                const bool selected = marked(i, j);
                weights[i * sources + j] = selected ? T(1) : T(0);
                any |= selected;
            }
            ws.any_block[i] = any;
        }
        gemm<T, false>(count, D * dp, sources, weights, sources, src_h, D * dp,
                       ws.h_block.data(), D * dp);
        gemm<T, false>(count, dp, sources, weights, sources, src_z, dp, ws.z_block.data(), dp);
    }

    // H_I and Z_I of the group's query tiles first .. first + count (index (h % group) * nq +
    // qt) of kv head (b, hk), summed over their marginal key tiles.
    void gather_query_states(LinearWorkspace<T>& ws, int64_t b, int64_t hk, int64_t first,
                             int64_t count) const {
        gather_block(ws, count, nk, tile_h.data(), tile_z.data(),
                     [&](int64_t i, int64_t kt) { return slot_marks(b, hk, first + i, kt); });
    }

    // Numerator rows phi H into ws.num; returns nothing, denominators into ws.d_den.
    void numerator_and_denominator(LinearWorkspace<T>& ws, int64_t rows) const {
        gemm<T, false>(rows, dp, D, ws.phi.data(), dp, ws.h, dp, ws.num.data(), dp);
        denominators(ws, rows);
    }

    // O_l rows num / den (0 where the denominator is exactly 0) of `rows` rows into dst.
    void write_output(const LinearWorkspace<T>& ws, int64_t rows, T* dst) const {
        for (int64_t r = 0; r < rows; ++r) {
            const T den = ws.d_den[r];
            for (int64_t d = 0; d < D; ++d)
                dst[r * D + d] = den != T(0) ? ws.num[r * dp + d] / den : T(0);
        }
    }

    // Denominators phi(q_i) . Z_I + eps into ws.d_den.
    void denominators(LinearWorkspace<T>& ws, int64_t rows) const {
        for (int64_t r = 0; r < rows; ++r) {
            T den = 0;
            for (int64_t d = 0; d < D; ++d) den += ws.phi[r * dp + d] * ws.z[d];
            ws.d_den[r] = den + static_cast<T>(a.eps);
        }
    }

    void forward() {
        const Shape& sh = a.shape;
        const int64_t slots = group * nq;  // the query tiles of one kv head's group
        const int64_t block = tiles_per_task(slots, threads());
        const int64_t tasks = tile_count(slots, block);
        T* out = static_cast<T*>(a.out);
        auto workspaces = per_thread<LinearWorkspace<T>>(threads(), std::max(Bq, Bk), D, block,
                                                         nk);
        for (int64_t b = 0; b < sh.batch; ++b) {
            for (int64_t hk = 0; hk < sh.kv_heads; ++hk) {
                key_summaries(workspaces, b, hk);
#pragma omp parallel for num_threads(threads()) schedule(dynamic, 1)
                for (int64_t task = 0; task < tasks; ++task) {
                    LinearWorkspace<T>& ws = workspaces[thread_index()];
                    const int64_t first = task * block, count = std::min(block, slots - first);
                    gather_query_states(ws, b, hk, first, count);
                    for (int64_t i = 0; i < count; ++i) {
                        const int64_t h = hk * group + (first + i) / nq, qt = (first + i) % nq;
                        const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
                        T* dst = out + ((b * sh.q_heads + h) * sh.q_len + row0) * D;
                        if (!ws.select(i, D)) {  // no marginal tile: O_l = 0
                            std::fill(dst, dst + rows * D, T(0));
                            continue;
                        }
                        load_features(ws, q, b, h, row0, rows);
                        numerator_and_denominator(ws, rows);
                        write_output(ws, rows, dst);
                    }
                }
            }
        }
    }

    // Backward, per query tile: dq, dH_I and dZ_I, from its H_I and Z_I in ws.h, ws.z (any:
    // it has a marginal tile).
    void query_tile_backward(LinearWorkspace<T>& ws, const Strided<T>& g, int64_t b, int64_t h,
                             int64_t qt, bool any) {
        const Shape& sh = a.shape;
        const int64_t slot = (h % group) * nq + qt;  // within the kv head's group
        const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
        T* dq = static_cast<T*>(a.dq) + ((b * sh.q_heads + h) * sh.q_len + row0) * D;
        T* dh = query_dh.data() + slot * D * dp;
        T* dz = query_dz.data() + slot * dp;
        T* o_linear = a.out == nullptr ? nullptr
                                       : static_cast<T*>(a.out) +
                                             ((b * sh.q_heads + h) * sh.q_len + row0) * D;
        if (!any) {
            if (o_linear != nullptr) std::fill(o_linear, o_linear + rows * D, T(0));
            std::fill(dq, dq + rows * D, T(0));
            std::fill(dh, dh + D * dp, T(0));
            std::fill(dz, dz + dp, T(0));
            return;
        }
        load_features(ws, q, b, h, row0, rows);
        if (o_linear != nullptr) {  // O_l as well (linear_backward_and_output): the forward's
            numerator_and_denominator(ws, rows);  // own numbers, from the same H_I and Z_I
            write_output(ws, rows, o_linear);
        } else {
            denominators(ws, rows);
        }
        load_rows(g, b, h, row0, rows, D, T(1), ws.d_num.data(), dp);
        for (int64_t r = 0; r < rows; ++r) {  // d_num = g / den (0 where the output is 0)
            const T den = ws.d_den[r];
            T* d_num = ws.d_num.data() + r * dp;
            for (int64_t d = 0; d < D; ++d) d_num[d] = den != T(0) ? d_num[d] / den : T(0);
        }
        // d_phi = d_num H^T + d_den Z, where d_den = -(g . O_l) / den and g . O_l =
        // phi . (g H^T) / den = phi . (d_num H^T): no numerator phi H is formed (the GPU's
        // query stage takes the same identity).
        transpose(D, D, ws.h, dp, ws.h_t.data(), dp);
        gemm<T, false>(rows, dp, D, ws.d_num.data(), dp, ws.h_t.data(), dp, ws.d_phi.data(),
                       dp);
        for (int64_t r = 0; r < rows; ++r) {
            T* d_phi = ws.d_phi.data() + r * dp;
            const T den = ws.d_den[r];
            T g_dot_out = 0;
            for (int64_t d = 0; d < D; ++d) g_dot_out += ws.phi[r * dp + d] * d_phi[d];
            ws.d_den[r] = den != T(0) ? -g_dot_out / den : T(0);
            for (int64_t d = 0; d < D; ++d) d_phi[d] += ws.d_den[r] * ws.z[d];
            feature_map_vjp_row(a.feature_map, ws.x.data() + r * dp, ws.phi.data() + r * dp,
                                d_phi, dq + r * D, D);
        }
        // dH_I = phi^T d_num, dZ_I = phi^T d_den.
        transpose(rows, D, ws.phi.data(), dp, ws.phi_t.data(), ws.rows_pad);
        gemm<T, false>(D, dp, rows, ws.phi_t.data(), ws.rows_pad, ws.d_num.data(), dp, dh, dp);
        std::fill(dz, dz + dp, T(0));
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t d = 0; d < D; ++d) dz[d] += ws.d_den[r] * ws.phi[r * dp + d];
    }

    // Backward, per key tile: dk and dv from dG (the sum of dH_I over the query tiles and GQA
    // heads that marked it) in ws.h and dz (of dZ_I) in ws.z; any: some query tile marked it.
    void key_tile_backward(LinearWorkspace<T>& ws, int64_t b, int64_t hk, int64_t kt, bool any) {
        const Shape& sh = a.shape;
        const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
        const int64_t flat0 = (b * sh.kv_heads + hk) * sh.kv_len + key0;
        T* dk = static_cast<T*>(a.dk) + flat0 * D;
        T* dv = static_cast<T*>(a.dv) + flat0 * D;
        if (!any) {
            std::fill(dk, dk + keys * D, T(0));
            std::fill(dv, dv + keys * D, T(0));
            return;
        }
        load_features(ws, k, b, hk, key0, keys);
        load_rows(v, b, hk, key0, keys, D, T(1), ws.v.data(), dp);
        // dV = phi(K) dG.
        gemm<T, false>(keys, dp, D, ws.phi.data(), dp, ws.h, dp, ws.num.data(), dp);
        for (int64_t r = 0; r < keys; ++r)
            for (int64_t d = 0; d < D; ++d) dv[r * D + d] = ws.num[r * dp + d];
        // d_phi(K) = V dG^T + dz.
        transpose(D, D, ws.h, dp, ws.h_t.data(), dp);
        gemm<T, false>(keys, dp, D, ws.v.data(), dp, ws.h_t.data(), dp, ws.d_phi.data(), dp);
        for (int64_t r = 0; r < keys; ++r) {
            T* d_phi = ws.d_phi.data() + r * dp;
            for (int64_t d = 0; d < D; ++d) d_phi[d] += ws.z[d];
            feature_map_vjp_row(a.feature_map, ws.x.data() + r * dp, ws.phi.data() + r * dp,
                                d_phi, dk + r * D, D);
        }
    }

    void backward() {
        const Shape& sh = a.shape;
        query_dh.assign(group * nq * D * dp, T(0));
        query_dz.assign(group * nq * dp, T(0));
        const Strided<T> g = strided<T>(a.d_linear);
        const int64_t slots = group * nq;  // the query tiles of one kv head's group
        const int64_t query_block = tiles_per_task(slots, threads());
        const int64_t key_block = tiles_per_task(nk, threads());
        const int64_t query_tasks = tile_count(slots, query_block);
        const int64_t key_tasks = tile_count(nk, key_block);
        auto workspaces = per_thread<LinearWorkspace<T>>(
            threads(), std::max(Bq, Bk), D, std::max(query_block, key_block), std::max(nk, slots));
        for (int64_t b = 0; b < sh.batch; ++b) {
            for (int64_t hk = 0; hk < sh.kv_heads; ++hk) {
                key_summaries(workspaces, b, hk);
#pragma omp parallel num_threads(threads())
                {
#pragma omp for schedule(dynamic, 1)
                    for (int64_t task = 0; task < query_tasks; ++task) {
                        LinearWorkspace<T>& ws = workspaces[thread_index()];
                        const int64_t first = task * query_block;
                        const int64_t count = std::min(query_block, slots - first);
                        gather_query_states(ws, b, hk, first, count);
                        for (int64_t i = 0; i < count; ++i) {
                            const bool any = ws.select(i, D);
                            query_tile_backward(ws, g, b, hk * group + (first + i) / nq,
                                                (first + i) % nq, any);
                        }
                    }
                    // The implicit barrier above makes every dH_I, dZ_I visible here.
#pragma omp for schedule(dynamic, 1)
                    for (int64_t task = 0; task < key_tasks; ++task) {
                        LinearWorkspace<T>& ws = workspaces[thread_index()];
                        const int64_t first = task * key_block;
                        const int64_t count = std::min(key_block, nk - first);
                        // dG and dz of key tiles first .. first + count: the dH_I, dZ_I of
                        // every group slot that marked them.
                        gather_block(ws, count, slots, query_dh.data(), query_dz.data(),
                                     [&](int64_t i, int64_t slot) {
                                         return slot_marks(b, hk, slot, first + i);
                                     });
                        for (int64_t i = 0; i < count; ++i) {
                            const bool any = ws.select(i, D);
                            key_tile_backward(ws, b, hk, first + i, any);
                        }
                    }
                }
            }
        }
    }
};

struct RunLinear {
    const LinearArgs& a;
    bool backward;

    template <typename In>
    void operator()() const {
        Linear<In, typename AccumulatorOf<In>::type> linear(a);
        if (backward)
            linear.backward();
        else
            linear.forward();
    }
};

}  // namespace

void linear_forward(const LinearArgs& args) {
    dispatch_dtype(args.shape.dtype, RunLinear{args, false});
}

void linear_backward(const LinearArgs& args) {
    dispatch_dtype(args.shape.dtype, RunLinear{args, true});
}

}  // namespace psa
