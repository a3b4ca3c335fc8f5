// The CPU backend's dense products (kernels.hpp, MatmulArgs): the register-blocked gemm of the
// tile loops, parallel over blocks of rows of C and slices of k (dW = dO^T O_l has m = D and
// k = every row of every head), the slices' partial products summed in a fixed order.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "dtypes.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "openmp.hpp"
#include "simd.hpp"

namespace psa {
namespace {

template <typename T>
void run_matmul(const MatmulArgs& x) {
    const int64_t np = round_up_lanes<T>(x.n);  // the gemm's columns: whole vectors
    const int threads = std::max(1, thread_count(x.threads));
    const T* a = static_cast<const T*>(x.a);
    const T* b_in = static_cast<const T*>(x.b);
    T* c = static_cast<T*>(x.c);
    // B as the gemm reads it: row-major with whole vectors a row. A B that already is (dW's
    // O_l rows) is read in place; otherwise (the projection's W^T, D x D) it is copied into a
    // (k x np) panel with zero columns past n.
    const bool in_place = x.b_col == 1 && np == x.n;
    std::vector<T> panel(in_place ? 0 : x.k * np, T(0));
    if (!in_place) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < x.k; ++p)
            for (int64_t j = 0; j < x.n; ++j)
                panel[p * np + j] = b_in[p * x.b_row + j * x.b_col];
    }
    const T* b = in_place ? b_in : panel.data();
    const int64_t ldb = in_place ? x.b_row : np;

    // k in slices whose length depends on k alone (at least kMinSlice, at most kMaxSlices of
    // them, which bounds the partials' memory), each slice's product into its own partial C,
    // the partials then added slice by slice: the same sums whatever the thread count (the
    // CPU backend's results are bitwise independent of it). One slice (the projection's
    // k = D) writes C directly.
    constexpr int64_t kMinSlice = 1024, kMaxSlices = 64;
    // Rows of C a task: all of them when there are few (dW's D), so that a slice of B is
    // streamed once; else blocks of 4 x kMicroRows.
    const int64_t rows_per_task = x.m <= 256 ? std::max<int64_t>(x.m, 1) : 4 * kMicroRows;
    const int64_t slice = std::max(kMinSlice, (x.k + kMaxSlices - 1) / kMaxSlices);
    const int64_t slices = std::max<int64_t>(1, (x.k + slice - 1) / slice);
    const int64_t row_tasks = (x.m + rows_per_task - 1) / rows_per_task;
    std::vector<T> partial(slices == 1 && np == x.n ? 0 : slices * x.m * np);
    T* target = partial.empty() ? c : partial.data();
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < slices * row_tasks; ++task) {
        const int64_t s = task / row_tasks, r0 = (task % row_tasks) * rows_per_task;
        const int64_t rows = std::min(rows_per_task, x.m - r0);
        const int64_t p0 = s * slice, p1 = std::min(p0 + slice, x.k);
        T* out = target + (s * x.m + r0) * np;
        // The slice in chunks of kMinSlice rows of B (a chunk stays in L2 while every row block
        // of C uses it), accumulated in chunk order: the first writes, the others add.
        const T* a_rows = a + r0 * x.a_row;
        gemm_strided<T, false>(rows, np, std::min(p0 + kMinSlice, p1) - p0, a_rows + p0 * x.a_col,
                               x.a_row, x.a_col, b + p0 * ldb, ldb, out, np);
        for (int64_t c0 = p0 + kMinSlice; c0 < p1; c0 += kMinSlice)
            gemm_strided<T, true>(rows, np, std::min(c0 + kMinSlice, p1) - c0,
                                  a_rows + c0 * x.a_col, x.a_row, x.a_col, b + c0 * ldb, ldb, out,
                                  np);
    }
    if (partial.empty()) return;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < x.m; ++i)
        for (int64_t j = 0; j < x.n; ++j) {
            T sum = 0;
            for (int64_t s = 0; s < slices; ++s) sum += partial[(s * x.m + i) * np + j];
            c[i * x.n + j] = sum;
        }
}

}  // namespace

void matmul(const MatmulArgs& args) {
    if (args.dtype == DTYPE_F32)
        run_matmul<float>(args);
    else if (args.dtype == DTYPE_F64)
        run_matmul<double>(args);
    else
        throw std::invalid_argument("matmul: float32 or float64 only");
}

}  // namespace psa
