// The fused forward tile loop: online softmax over each query tile's visit list, with the
// in-loop skip rules (Blasst, Cef, Recall bound and exact) and the statistics.
//
// One task is one (batch, head, query tile); tasks are independent, so the OpenMP loop needs
// no synchronisation. The loop works on transposed logits S^T = K (scale Q)^T: Q^T is built
// once per task, K is read in place (its rows are broadcast element by element, so its strides
// cost nothing), and every per-row statistic (max, sum, rescale) becomes a vector operation
// across query rows. O += P.V reads P^T through strides and V in place when its rows are
// contiguous float32/float64. Against the plain S = Q K^T formulation, this removes a transpose
// of K per tile and the scalar row maxima: 60 -> 87 GFLOP/s on one core of the benchmark
// machine (dense, N = 2048, D = 64). V is touched only for kept tiles: a skipped tile costs its
// Q.K^T only.
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

enum RuleCode : int { NO_SKIP = 0, BLASST = 1, CEF = 2, RECALL = 3, RECALL_EXACT = 4 };

template <typename T>
struct ForwardWorkspace {
    int64_t d_pad, rows_pad;
    // qt: (scale Q)^T, D x rows_pad; st: S^T, Bk x rows_pad; k, v: widened tiles when the
    // input cannot be read in place; o: the output accumulator, Bq x d_pad.
    std::vector<T> qt, st, k, v, o, m, l, u, tile_max, added, alpha;

    ForwardWorkspace(int64_t block_q, int64_t block_k, int64_t dim)
        : d_pad(round_up_lanes<T>(dim)), rows_pad(round_up_lanes<T>(block_q)),
          qt(dim * rows_pad), st(block_k * rows_pad), k(block_k * d_pad), v(block_k * d_pad),
          o(block_q * d_pad), m(rows_pad), l(rows_pad), u(rows_pad), tile_max(rows_pad),
          added(rows_pad), alpha(rows_pad) {}
};

// Whether every valid row may skip the tile; fills ws.added with each row's skipped mass (the
// bound nJ*exp(mt - m), or the exact sum for RECALL_EXACT) for the caller to add on a skip.
template <typename T>
bool may_skip(ForwardWorkspace<T>& ws, int64_t rows, int64_t keys, int code, T param) {
    const int64_t cols = ws.rows_pad;
    if (code == RECALL || code == RECALL_EXACT) {
        // Recall(1) never skips. Its test "u + added <= 0" would pass in float32 once
        // exp(mt - m) underflows (below about -87), where float64 still sees positive mass.
        if (!(param > T(0))) return false;
        if (code == RECALL) {
            constexpr int W = Simd<T>::lanes;
            for (int64_t c = 0; c < cols; c += W)
                store_vec(ws.added.data() + c,
                          exp_vec(load_vec(ws.tile_max.data() + c) - load_vec(ws.m.data() + c)) *
                              static_cast<T>(keys));
        } else {
            column_exp_sums(keys, ws.st.data(), cols, cols, ws.m.data(), ws.added.data());
        }
        for (int64_t i = 0; i < rows; ++i)
            if (!(ws.u[i] + ws.added[i] <= param * ws.l[i])) return false;
        return true;
    }
    for (int64_t i = 0; i < rows; ++i) {
        const T gap = ws.tile_max[i] - ws.m[i];
        if (code == BLASST && !(gap < param)) return false;
        if (code == CEF && !(gap - std::log(ws.l[i]) < param)) return false;
    }
    return code == BLASST || code == CEF;
}

template <typename In, typename T>
void forward_task(const ForwardArgs& a, const Strided<In>& q, const Strided<In>& k,
                  const Strided<In>& v, ForwardWorkspace<T>& ws, int64_t b, int64_t h,
                  int64_t qt) {
    const Shape& sh = a.shape;
    const int64_t D = sh.dim, Bq = sh.block_q, Bk = sh.block_k;
    const int64_t nq = tile_count(sh.q_len, Bq), nk = tile_count(sh.kv_len, Bk);
    const int64_t hk = h / (sh.q_heads / sh.kv_heads);
    const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
    const int64_t task = (b * sh.q_heads + h) * nq + qt;
    const int32_t* visit = a.visit + task * a.max_count;
    const int32_t n_visit = a.count[task];
    const T param = static_cast<T>(a.rule_param);
    const int64_t dp = ws.d_pad, cols = ws.rows_pad;

    load_rows_transposed(q, b, h, row0, rows, D, static_cast<T>(a.scale), ws.qt.data(), cols);
    for (int64_t i = 0; i < cols; ++i) {
        // Padded columns (i >= rows) get a finite state so that vector updates stay finite;
        // they never reach a decision or the output.
        ws.m[i] = i < rows ? T(-INFINITY) : T(0);
        ws.l[i] = i < rows ? T(0) : T(1);
        ws.u[i] = 0;
    }
    std::fill(ws.o.begin(), ws.o.begin() + rows * dp, T(0));

    for (int32_t t = 0; t < n_visit; ++t) {
        const int64_t kt = visit[t];
        const int64_t key0 = kt * Bk, keys = std::min(Bk, sh.kv_len - key0);
        if (a.visited) a.visited[task * nk + kt] = 1;

        // S^T = K (scale Q)^T, keys x cols.
        const TileView<T> k_tile = tile_view(k, b, hk, key0, keys, D, false, ws.k.data(), dp);
        gemm_strided<T, false>(keys, cols, D, k_tile.data, k_tile.row, k_tile.col, ws.qt.data(),
                               cols, ws.st.data(), cols);
        column_max(keys, ws.st.data(), cols, cols, ws.tile_max.data());

        if (t > 0 && a.rule_code != NO_SKIP && may_skip(ws, rows, keys, a.rule_code, param)) {
            for (int64_t i = 0; i < rows; ++i) ws.u[i] += ws.added[i];
            continue;
        }
        if (a.kept) a.kept[task * nk + kt] = 1;

        online_softmax_update_columns(keys, ws.st.data(), cols, cols, ws.tile_max.data(),
                                      ws.m.data(), ws.l.data(), ws.u.data(), ws.alpha.data());
        for (int64_t i = 0; i < rows; ++i) {
            const T alpha = ws.alpha[i];
            if (alpha == T(1)) continue;
            T* o = ws.o.data() + i * dp;
            for (int64_t d = 0; d < dp; ++d) o[d] *= alpha;
        }
        // O += P V with P(i, j) = st[j * cols + i].
        const TileView<T> v_tile = tile_view(v, b, hk, key0, keys, D, true, ws.v.data(), dp);
        gemm_strided<T, true>(rows, dp, keys, ws.st.data(), 1, cols, v_tile.data, v_tile.row,
                              ws.o.data(), dp);
    }

    In* out = static_cast<In*>(a.out);
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t flat = (b * sh.q_heads + h) * sh.q_len + row0 + i;
        const T inv_l = T(1) / ws.l[i];
        const T* o = ws.o.data() + i * dp;
        In* dst = out + flat * D;
        for (int64_t d = 0; d < D; ++d) narrow(o[d] * inv_l, dst + d);
        a.lse[flat] = static_cast<float>(ws.m[i] + std::log(ws.l[i]));
        if (a.recall_bound)
            a.recall_bound[flat] = static_cast<float>(ws.l[i] / (ws.l[i] + ws.u[i]));
    }
}

struct RunForward {
    const ForwardArgs& a;

    template <typename In>
    void operator()() const {
        typedef typename AccumulatorOf<In>::type T;
        const Shape& sh = a.shape;
        const auto q = strided<In>(a.q), k = strided<In>(a.k), v = strided<In>(a.v);
        const int64_t nq = tile_count(sh.q_len, sh.block_q);
        const int64_t tasks = sh.batch * sh.q_heads * nq;
        const int threads = thread_count(sh.threads);
        auto workspaces = per_thread<ForwardWorkspace<T>>(threads, sh.block_q, sh.block_k, sh.dim);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t qt = task % nq, bh = task / nq;
            forward_task<In, T>(a, q, k, v, workspaces[thread_index()], bh / sh.q_heads,
                                bh % sh.q_heads, qt);
        }
    }
};

}  // namespace

void attention_forward(const ForwardArgs& args) { dispatch_dtype(args.shape.dtype, RunForward{args}); }

}  // namespace psa
