// Backward pass of attention restricted to a fixed kept-tile set (the forward's decisions are
// replayed, not re-taken): dq, dk, dv by FlashAttention-2's recomputation scheme.
//
// Pass 1, one task per (batch, head, query tile): recompute O and the LSE over the kept tiles,
// Delta_i = dO_i . O_i (each skipped when the forward's saved value is given: with both the
// recomputation loop does not run, with the LSE alone it still accumulates O, with Delta alone
// it runs without the P V product), then dQ = scale * sum_J dS_J K_J with dS = P * (dP - Delta),
// P = exp(S - LSE), dP = dO V^T. Pass 2, one task per (batch, kv head, key tile): dV = P^T dO
// and dK = scale * dS^T Q, summed over the query tiles that kept the key tile and over the
// query heads of the GQA group. Each task owns its output rows: no atomics, no reductions.
//
// As in the forward, each task transposes only what it reuses across its whole loop (Q^T and
// dO^T in pass 1, K^T and V^T in pass 2); the operand that changes from tile to tile is read
// in place through its strides (gemm.hpp broadcasts A element by element), and P, dS are
// consumed transposed through strides rather than copied.
#include <cmath>
#include <vector>

#include "dispatch.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "online_softmax.hpp"
#include "openmp.hpp"
#include "simd.hpp"
#include "strided.hpp"

namespace psa {
namespace {

// Pass 1, column form: st is S^T (keys x cols), one column per query row.
template <typename T>
struct QueryTileWorkspace {
    int64_t d_pad, cols;
    std::vector<T> q_t, d_out_t, k, v, st, dpt, o, dq, m, l, u, tile_max, alpha, lse, delta;

    QueryTileWorkspace(int64_t block_q, int64_t block_k, int64_t dim)
        : d_pad(round_up_lanes<T>(dim)), cols(round_up_lanes<T>(block_q)),
          q_t(dim * cols), d_out_t(dim * cols), k(block_k * d_pad), v(block_k * d_pad),
          st(block_k * cols), dpt(block_k * cols), o(block_q * d_pad), dq(block_q * d_pad),
          m(cols), l(cols), u(cols), tile_max(cols), alpha(cols), lse(cols), delta(cols) {}
};

// Pass 2, row form: s is S (rows x keys_pad), one row per query row.
template <typename T>
struct KeyTileWorkspace {
    int64_t d_pad, keys_pad;
    std::vector<T> k_t, v_t, q, d_out, s, dp, dk, dv;

    KeyTileWorkspace(int64_t block_q, int64_t block_k, int64_t dim)
        : d_pad(round_up_lanes<T>(dim)), keys_pad(round_up_lanes<T>(block_k)),
          k_t(dim * keys_pad), v_t(dim * keys_pad), q(block_q * d_pad), d_out(block_q * d_pad),
          s(block_q * keys_pad), dp(block_q * keys_pad), dk(block_k * d_pad),
          dv(block_k * d_pad) {}
};

template <typename In, typename T>
struct Backward {
    const BackwardArgs& a;
    Strided<In> q, k, v, d_out;
    int64_t D, Bq, Bk, nq, nk, group;
    std::vector<T> lse, delta;  // (B, Hq, Nq), from pass 1 for pass 2

    explicit Backward(const BackwardArgs& args)
        : a(args), q(strided<In>(args.q)), k(strided<In>(args.k)), v(strided<In>(args.v)),
          d_out(strided<In>(args.d_out)), D(args.shape.dim), Bq(args.shape.block_q),
          Bk(args.shape.block_k), nq(tile_count(args.shape.q_len, Bq)),
          nk(tile_count(args.shape.kv_len, Bk)),
          group(args.shape.q_heads / args.shape.kv_heads),
          lse(args.shape.batch * args.shape.q_heads * args.shape.q_len),
          delta(args.shape.batch * args.shape.q_heads * args.shape.q_len) {}

    bool is_kept(int64_t b, int64_t h, int64_t qt, int64_t kt) const {
        return a.kept[((b * a.shape.q_heads + h) * nq + qt) * nk + kt] != 0;
    }

    void query_tile(QueryTileWorkspace<T>& ws, int64_t b, int64_t h, int64_t qt) {
        const Shape& sh = a.shape;
        const int64_t hk = h / group, row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
        const int64_t dp = ws.d_pad, cols = ws.cols;
        const T scale = static_cast<T>(a.scale);
        load_rows_transposed(q, b, h, row0, rows, D, scale, ws.q_t.data(), cols);
        load_rows_transposed(d_out, b, h, row0, rows, D, T(1), ws.d_out_t.data(), cols);
        for (int64_t i = 0; i < cols; ++i) {
            // Padded columns get a finite state and never reach an output.
            ws.m[i] = i < rows ? T(-INFINITY) : T(0);
            ws.l[i] = i < rows ? T(0) : T(1);
            ws.u[i] = 0;
        }
        std::fill(ws.o.begin(), ws.o.begin() + rows * dp, T(0));
        std::fill(ws.dq.begin(), ws.dq.begin() + rows * dp, T(0));

        const int64_t flat0 = (b * sh.q_heads + h) * sh.q_len + row0;
        const T* saved_lse = a.saved_lse ? static_cast<const T*>(a.saved_lse) + flat0 : nullptr;
        const T* saved_delta =
            a.saved_delta ? static_cast<const T*>(a.saved_delta) + flat0 : nullptr;
        const bool recompute = saved_lse == nullptr || saved_delta == nullptr;
        const bool need_output = saved_delta == nullptr;

        // Recompute O and the LSE of the kept set (the forward's column-form loop, no skips).
        for (int64_t kt = 0; recompute && kt < nk; ++kt) {
            if (!is_kept(b, h, qt, kt)) continue;
            const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
            const TileView<T> kv = tile_view(k, b, hk, key0, keys, D, false, ws.k.data(), dp);
            gemm_strided<T, false>(keys, cols, D, kv.data, kv.row, kv.col, ws.q_t.data(), cols,
                                   ws.st.data(), cols);
            column_max(keys, ws.st.data(), cols, cols, ws.tile_max.data());
            online_softmax_update_columns(keys, ws.st.data(), cols, cols, ws.tile_max.data(),
                                          ws.m.data(), ws.l.data(), ws.u.data(),
                                          ws.alpha.data());
            if (!need_output) continue;
            for (int64_t i = 0; i < rows; ++i)
                if (ws.alpha[i] != T(1))
                    for (int64_t d = 0; d < dp; ++d) ws.o[i * dp + d] *= ws.alpha[i];
            const TileView<T> vv = tile_view(v, b, hk, key0, keys, D, true, ws.v.data(), dp);
            gemm_strided<T, true>(rows, dp, keys, ws.st.data(), 1, cols, vv.data, vv.row,
                                  ws.o.data(), dp);
        }
        for (int64_t i = 0; i < cols; ++i) {
            if (i >= rows) {  // padded columns: P = exp(s - inf) = 0, Delta = 0
                ws.lse[i] = T(INFINITY);
                ws.delta[i] = 0;
                continue;
            }
            if (saved_delta) {
                ws.delta[i] = delta[flat0 + i] = saved_delta[i];
            } else {
                T dot = 0;
                for (int64_t d = 0; d < D; ++d)
                    dot += ws.d_out_t[d * cols + i] * ws.o[i * dp + d];
                ws.delta[i] = delta[flat0 + i] = dot / ws.l[i];
            }
            ws.lse[i] = lse[flat0 + i] = saved_lse ? saved_lse[i] : ws.m[i] + std::log(ws.l[i]);
        }

        // dQ = scale * sum_J dS_J K_J, from S^T, dP^T = V dO^T and dS^T = P^T (dP^T - Delta).
        for (int64_t kt = 0; kt < nk; ++kt) {
            if (!is_kept(b, h, qt, kt)) continue;
            const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
            const TileView<T> kv = tile_view(k, b, hk, key0, keys, D, true, ws.k.data(), dp);
            gemm_strided<T, false>(keys, cols, D, kv.data, kv.row, kv.col, ws.q_t.data(), cols,
                                   ws.st.data(), cols);
            const TileView<T> vv = tile_view(v, b, hk, key0, keys, D, false, ws.v.data(), dp);
            gemm_strided<T, false>(keys, cols, D, vv.data, vv.row, vv.col, ws.d_out_t.data(),
                                   cols, ws.dpt.data(), cols);
            for (int64_t j = 0; j < keys; ++j) {
                T* pt = ws.st.data() + j * cols;
                T* dst = ws.dpt.data() + j * cols;
                exp_shift_columns(pt, ws.lse.data(), cols);
                for (int64_t i = 0; i < cols; ++i) dst[i] = pt[i] * (dst[i] - ws.delta[i]);
            }
            gemm_strided<T, true>(rows, dp, keys, ws.dpt.data(), 1, cols, kv.data, kv.row,
                                  ws.dq.data(), dp);
        }
        T* dq = static_cast<T*>(a.dq) + flat0 * D;
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t d = 0; d < D; ++d) dq[i * D + d] = scale * ws.dq[i * dp + d];
    }

    void key_tile(KeyTileWorkspace<T>& ws, int64_t b, int64_t hk, int64_t kt) {
        const Shape& sh = a.shape;
        const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
        const int64_t dp = ws.d_pad, kp = ws.keys_pad;
        const T scale = static_cast<T>(a.scale);
        // S = Q (scale K)^T and dP = dO V^T, rows x kp.
        load_rows_transposed(k, b, hk, key0, keys, D, scale, ws.k_t.data(), kp);
        load_rows_transposed(v, b, hk, key0, keys, D, T(1), ws.v_t.data(), kp);
        std::fill(ws.dk.begin(), ws.dk.begin() + keys * dp, T(0));
        std::fill(ws.dv.begin(), ws.dv.begin() + keys * dp, T(0));

        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            for (int64_t qt = 0; qt < nq; ++qt) {
                if (!is_kept(b, h, qt, kt)) continue;
                const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
                const int64_t flat0 = (b * sh.q_heads + h) * sh.q_len + row0;
                const TileView<T> qv = tile_view(q, b, h, row0, rows, D, true, ws.q.data(), dp);
                const TileView<T> ov =
                    tile_view(d_out, b, h, row0, rows, D, true, ws.d_out.data(), dp);
                gemm_strided<T, false>(rows, kp, D, qv.data, qv.row, qv.col, ws.k_t.data(), kp,
                                       ws.s.data(), kp);
                gemm_strided<T, false>(rows, kp, D, ov.data, ov.row, ov.col, ws.v_t.data(), kp,
                                       ws.dp.data(), kp);
                for (int64_t i = 0; i < rows; ++i) {
                    T* p = ws.s.data() + i * kp;  // becomes P, then dS in dp
                    T* ds = ws.dp.data() + i * kp;
                    for (int64_t j = keys; j < kp; ++j) p[j] = -INFINITY;  // padded keys
                    exp_shift_sum(p, lse[flat0 + i], kp);
                    const T delta_i = delta[flat0 + i];
                    for (int64_t j = 0; j < kp; ++j) ds[j] = p[j] * (ds[j] - delta_i);
                }
                // dV += P^T dO and dK += dS^T Q, with P^T(j, i) = s[i * kp + j].
                gemm_strided<T, true>(keys, dp, rows, ws.s.data(), 1, kp, ov.data, ov.row,
                                      ws.dv.data(), dp);
                gemm_strided<T, true>(keys, dp, rows, ws.dp.data(), 1, kp, qv.data, qv.row,
                                      ws.dk.data(), dp);
            }
        }
        const int64_t flat0 = (b * sh.kv_heads + hk) * sh.kv_len + key0;
        T* dk = static_cast<T*>(a.dk) + flat0 * D;
        T* dv = static_cast<T*>(a.dv) + flat0 * D;
        for (int64_t r = 0; r < keys; ++r)
            for (int64_t d = 0; d < D; ++d) {
                dk[r * D + d] = scale * ws.dk[r * dp + d];
                dv[r * D + d] = ws.dv[r * dp + d];
            }
    }

    void run() {
        const Shape& sh = a.shape;
        const int64_t query_tasks = sh.batch * sh.q_heads * nq;
        const int64_t key_tasks = sh.batch * sh.kv_heads * nk;
        const int threads = thread_count(sh.threads);
        auto query_workspaces = per_thread<QueryTileWorkspace<T>>(threads, Bq, Bk, D);
        auto key_workspaces = per_thread<KeyTileWorkspace<T>>(threads, Bq, Bk, D);
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < query_tasks; ++task) {
                const int64_t bh = task / nq;
                query_tile(query_workspaces[thread_index()], bh / sh.q_heads, bh % sh.q_heads,
                           task % nq);
            }
            // The implicit barrier of the loop above makes every LSE and Delta visible here.
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < key_tasks; ++task) {
                const int64_t bh = task / nk;
                key_tile(key_workspaces[thread_index()], bh / sh.kv_heads, bh % sh.kv_heads,
                         task % nk);
            }
        }
    }
};

struct RunBackward {
    const BackwardArgs& a;

    template <typename In>
    void operator()() const {
        Backward<In, typename AccumulatorOf<In>::type>(a).run();
    }
};

}  // namespace

void attention_backward(const BackwardArgs& args) {
    dispatch_dtype(args.shape.dtype, RunBackward{args});
}

}  // namespace psa
