// The fused forward tile loop: online softmax over each query tile's visit list (the plan's
// CSR row), with an in-loop skip rule (a functor of gpu/skip_rules.cuh, one template instance
// each) and the statistics. A query tile with no visited tile gets O = 0, LSE = -inf.
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
#include "skip_rules.hpp"
#include "strided.hpp"

namespace psa {
namespace {

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

// The mass each row would skip with the tile, into ws.added: the tile's exact row sums for
// kExactMass rules, else the bound nJ * exp(tile_max - m).
template <class Rule, typename T>
void tile_skipped_mass(ForwardWorkspace<T>& ws, int64_t keys) {
    const int64_t cols = ws.rows_pad;
    if (Rule::kExactMass) {
        column_exp_sums(keys, ws.st.data(), cols, cols, ws.m.data(), ws.added.data());
        return;
    }
    constexpr int W = Simd<T>::lanes;
    for (int64_t c = 0; c < cols; c += W)
        store_vec(ws.added.data() + c,
                  exp_vec(load_vec(ws.tile_max.data() + c) - load_vec(ws.m.data() + c)) *
                      static_cast<T>(keys));
}

template <typename In, typename Out, typename T, class Rule>
void forward_task(const ForwardArgs& a, const Strided<In>& q, const Strided<In>& k,
                  const Strided<In>& v, ForwardWorkspace<T>& ws, int64_t b, int64_t h,
                  int64_t qt) {
    const Shape& sh = a.shape;
    const int64_t D = sh.dim, Bq = sh.block_q, Bk = sh.block_k;
    const int64_t nq = tile_count(sh.q_len, Bq), nk = tile_count(sh.kv_len, Bk);
    const int64_t hk = h / (sh.q_heads / sh.kv_heads);
    const int64_t row0 = qt * Bq, rows = std::min(Bq, sh.q_len - row0);
    const int64_t slab = b * sh.q_heads + h;
    const int64_t task = slab * nq + qt;
    const int32_t* offsets = a.row_offsets + slab * (nq + 1) + qt;
    const int32_t* visit = a.row_indices + slab * a.capacity + offsets[0];
    const int32_t n_visit = offsets[1] - offsets[0];
    const BoundRule<Rule, NaturalLogUnits, T> rule(a.rule_params, static_cast<int>(h));
    const int64_t dp = ws.d_pad, cols = ws.rows_pad;
    Out* out = static_cast<Out*>(a.out);
    T* lse = static_cast<T*>(a.lse);
    T* recall_bound = static_cast<T*>(a.recall_bound);

    if (n_visit == 0) {
        for (int64_t i = 0; i < rows; ++i) {
            const int64_t flat = slab * sh.q_len + row0 + i;
            for (int64_t d = 0; d < D; ++d) narrow(T(0), out + flat * D + d);
            lse[flat] = T(-INFINITY);
            if (recall_bound) recall_bound[flat] = T(1);
        }
        return;
    }

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

        if (Rule::kCanSkip && t > 0) {
            tile_skipped_mass<Rule>(ws, keys);
            bool skip = true;
            for (int64_t i = 0; i < rows && skip; ++i)
                skip = rule(ws.tile_max[i], ws.m[i], ws.l[i], ws.u[i], ws.added[i]);
            if (skip) {
                for (int64_t i = 0; i < rows; ++i) ws.u[i] += ws.added[i];
                continue;
            }
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

    for (int64_t i = 0; i < rows; ++i) {
        const int64_t flat = slab * sh.q_len + row0 + i;
        const T inv_l = T(1) / ws.l[i];
        const T* o = ws.o.data() + i * dp;
        Out* dst = out + flat * D;
        for (int64_t d = 0; d < D; ++d) narrow(o[d] * inv_l, dst + d);
        lse[flat] = ws.m[i] + std::log(ws.l[i]);
        if (recall_bound) recall_bound[flat] = ws.l[i] / (ws.l[i] + ws.u[i]);
    }
}

// One (input type, output type, rule) instance of the loop, parallel over tasks.
template <typename In, typename Out>
struct RunForwardRule {
    const ForwardArgs& a;

    template <class Rule>
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
            forward_task<In, Out, T, Rule>(a, q, k, v, workspaces[thread_index()],
                                           bh / sh.q_heads, bh % sh.q_heads, qt);
        }
    }
};

struct RunForward {
    const ForwardArgs& a;

    template <typename In>
    void operator()() const {
        if (a.out_float32)
            dispatch_rule(a.rule_functor, RunForwardRule<In, float>{a});
        else
            dispatch_rule(a.rule_functor, RunForwardRule<In, In>{a});
    }
};

}  // namespace

void attention_forward(const ForwardArgs& args) { dispatch_dtype(args.shape.dtype, RunForward{args}); }

}  // namespace psa
