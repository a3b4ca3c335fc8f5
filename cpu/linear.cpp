// The SLA linear branch and its gradient (docs/design.rst section 6):
// O_l,i = phi(q_i) H_I / (phi(q_i) . Z_I + eps), H_I = sum_{J marginal} phi(K_J)^T V_J,
// Z_I = sum_{J marginal} phi(K_J)^T 1.
//
// One (batch, kv head) at a time: per key tile the D x D summary phi(K_J)^T V_J is formed once
// (one task per key tile); each query tile of the head group then sums the summaries of its
// marginal tiles directly, which is O(nq nk D^2) against the sparse branch's O(N^2 D) and
// agrees with the float64 direct sum within float32 rounding. The backward runs the same steps
// in reverse: per query tile dH_I and dZ_I, then per key tile the sum of dH_I over the query
// tiles (and GQA heads) that marked it marginal. Holding the summaries of one kv head only
// keeps the extra memory at nk D^2 (+ group nq D^2 in the backward) floats: 8 MB at N = 32k,
// D = 128, where all heads at once would take hundreds of MB. All products are the gemm.
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
    std::vector<T> x, phi, phi_t, v, h, h_t, z, num, d_num, d_phi, dx, d_den;

    LinearWorkspace(int64_t block, int64_t dim)
        : d_pad(round_up_lanes<T>(dim)), rows_pad(round_up_lanes<T>(block)),
          x(block * d_pad), phi(block * d_pad), phi_t(dim * rows_pad), v(block * d_pad),
          h(dim * d_pad), h_t(dim * d_pad), z(d_pad), num(block * d_pad), d_num(block * d_pad),
          d_phi(block * d_pad), dx(block * d_pad), d_den(block) {}
};

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

    // H_I and Z_I of a query tile into ws.h, ws.z; false when it has no marginal tile.
    bool gather(LinearWorkspace<T>& ws, int64_t b, int64_t h, int64_t qt) const {
        bool any = false;
        std::fill(ws.h.begin(), ws.h.end(), T(0));
        std::fill(ws.z.begin(), ws.z.end(), T(0));
        for (int64_t kt = 0; kt < nk; ++kt) {
            if (!is_marginal(b, h, qt, kt)) continue;
            any = true;
            const T* th = tile_h.data() + kt * D * dp;
            const T* tz = tile_z.data() + kt * dp;
            for (int64_t i = 0; i < D * dp; ++i) ws.h[i] += th[i];
            for (int64_t d = 0; d < dp; ++d) ws.z[d] += tz[d];
        }
        return any;
    }

    // Numerator rows phi H into ws.num; returns nothing, denominators into ws.d_den.
    void numerator_and_denominator(LinearWorkspace<T>& ws, int64_t rows) const {
        gemm<T, false>(rows, dp, D, ws.phi.data(), dp, ws.h.data(), dp, ws.num.data(), dp);
        denominators(ws, rows);
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
        const int64_t tasks = group * nq;  // the query tiles of one kv head's group
        T* out = static_cast<T*>(a.out);
        auto workspaces = per_thread<LinearWorkspace<T>>(threads(), std::max(Bq, Bk), D);
        for (int64_t b = 0; b < sh.batch; ++b) {
            for (int64_t hk = 0; hk < sh.kv_heads; ++hk) {
                key_summaries(workspaces, b, hk);
#pragma omp parallel for num_threads(threads()) schedule(dynamic, 1)
                for (int64_t task = 0; task < tasks; ++task) {
                    LinearWorkspace<T>& ws = workspaces[thread_index()];
                    const int64_t h = hk * group + task / nq, qt = task % nq;
                    const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
                    T* dst = out + ((b * sh.q_heads + h) * sh.q_len + row0) * D;
                    if (!gather(ws, b, h, qt)) {
                        std::fill(dst, dst + rows * D, T(0));
                        continue;
                    }
                    load_features(ws, q, b, h, row0, rows);
                    numerator_and_denominator(ws, rows);
                    for (int64_t r = 0; r < rows; ++r) {
                        const T den = ws.d_den[r];
                        for (int64_t d = 0; d < D; ++d)
                            dst[r * D + d] = den != T(0) ? ws.num[r * dp + d] / den : T(0);
                    }
                }
            }
        }
    }

    // Backward, per query tile: dq, dH_I and dZ_I.
    void query_tile_backward(LinearWorkspace<T>& ws, const Strided<T>& g, int64_t b, int64_t h,
                             int64_t qt) {
        const Shape& sh = a.shape;
        const int64_t slot = (h % group) * nq + qt;  // within the kv head's group
        const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
        T* dq = static_cast<T*>(a.dq) + ((b * sh.q_heads + h) * sh.q_len + row0) * D;
        T* dh = query_dh.data() + slot * D * dp;
        T* dz = query_dz.data() + slot * dp;
        if (!gather(ws, b, h, qt)) {
            std::fill(dq, dq + rows * D, T(0));
            std::fill(dh, dh + D * dp, T(0));
            std::fill(dz, dz + dp, T(0));
            return;
        }
        load_features(ws, q, b, h, row0, rows);
        denominators(ws, rows);
        load_rows(g, b, h, row0, rows, D, T(1), ws.d_num.data(), dp);
        for (int64_t r = 0; r < rows; ++r) {  // d_num = g / den (0 where the output is 0)
            const T den = ws.d_den[r];
            T* d_num = ws.d_num.data() + r * dp;
            for (int64_t d = 0; d < D; ++d) d_num[d] = den != T(0) ? d_num[d] / den : T(0);
        }
        // d_phi = d_num H^T + d_den Z, where d_den = -(g . O_l) / den and g . O_l =
        // phi . (g H^T) / den = phi . (d_num H^T): no numerator phi H is formed (the GPU's
        // query stage takes the same identity).
        transpose(D, D, ws.h.data(), dp, ws.h_t.data(), dp);
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

    // Backward, per key tile: dk and dv from the dH_I, dZ_I of the query tiles marking it.
    void key_tile_backward(LinearWorkspace<T>& ws, int64_t b, int64_t hk, int64_t kt) {
        const Shape& sh = a.shape;
        const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
        const int64_t flat0 = (b * sh.kv_heads + hk) * sh.kv_len + key0;
        T* dk = static_cast<T*>(a.dk) + flat0 * D;
        T* dv = static_cast<T*>(a.dv) + flat0 * D;
        bool any = false;
        std::fill(ws.h.begin(), ws.h.end(), T(0));  // dG, the sum of dH_I
        std::fill(ws.z.begin(), ws.z.end(), T(0));  // dz, the sum of dZ_I
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            for (int64_t qt = 0; qt < nq; ++qt) {
                if (!is_marginal(b, h, qt, kt)) continue;
                any = true;
                const int64_t slot = (h % group) * nq + qt;
                const T* dh = query_dh.data() + slot * D * dp;
                const T* dz = query_dz.data() + slot * dp;
                for (int64_t i = 0; i < D * dp; ++i) ws.h[i] += dh[i];
                for (int64_t d = 0; d < dp; ++d) ws.z[d] += dz[d];
            }
        }
        if (!any) {
            std::fill(dk, dk + keys * D, T(0));
            std::fill(dv, dv + keys * D, T(0));
            return;
        }
        load_features(ws, k, b, hk, key0, keys);
        load_rows(v, b, hk, key0, keys, D, T(1), ws.v.data(), dp);
        // dV = phi(K) dG.
        gemm<T, false>(keys, dp, D, ws.phi.data(), dp, ws.h.data(), dp, ws.num.data(), dp);
        for (int64_t r = 0; r < keys; ++r)
            for (int64_t d = 0; d < D; ++d) dv[r * D + d] = ws.num[r * dp + d];
        // d_phi(K) = V dG^T + dz.
        transpose(D, D, ws.h.data(), dp, ws.h_t.data(), dp);
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
        const int64_t query_tasks = group * nq;
        auto workspaces = per_thread<LinearWorkspace<T>>(threads(), std::max(Bq, Bk), D);
        for (int64_t b = 0; b < sh.batch; ++b) {
            for (int64_t hk = 0; hk < sh.kv_heads; ++hk) {
                key_summaries(workspaces, b, hk);
#pragma omp parallel num_threads(threads())
                {
#pragma omp for schedule(dynamic, 1)
                    for (int64_t task = 0; task < query_tasks; ++task)
                        query_tile_backward(workspaces[thread_index()], g, b,
                                            hk * group + task / nq, task % nq);
                    // The implicit barrier above makes every dH_I, dZ_I visible here.
#pragma omp for schedule(dynamic, 1)
                    for (int64_t kt = 0; kt < nk; ++kt)
                        key_tile_backward(workspaces[thread_index()], b, hk, kt);
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
