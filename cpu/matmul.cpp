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
    // B as a row-major (k x np) panel with zero columns past n: one pass over B, which is
    // D x D for the projection (for dW it is O_l, read once either way).
    std::vector<T> b(x.k * np, T(0));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < x.k; ++p)
        for (int64_t j = 0; j < x.n; ++j) b[p * np + j] = b_in[p * x.b_row + j * x.b_col];

    // k in slices of a fixed length, each slice's product into its own partial C, the
    // partials then added slice by slice: the same sums whatever the thread count (the CPU
    // backend's results are bitwise independent of it). One slice (k <= kSlice, the
    // projection's D) writes C directly.
    constexpr int64_t kSlice = 1024;
    constexpr int64_t kRowsPerTask = 4 * kMicroRows;
    const int64_t slices = std::max<int64_t>(1, (x.k + kSlice - 1) / kSlice);
    const int64_t row_tasks = (x.m + kRowsPerTask - 1) / kRowsPerTask;
    std::vector<T> partial(slices == 1 && np == x.n ? 0 : slices * x.m * np);
    T* target = partial.empty() ? c : partial.data();
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < slices * row_tasks; ++task) {
        const int64_t s = task / row_tasks, r0 = (task % row_tasks) * kRowsPerTask;
        const int64_t rows = std::min(kRowsPerTask, x.m - r0);
        const int64_t p0 = s * kSlice, p1 = std::min(p0 + kSlice, x.k);
        gemm_strided<T, false>(rows, np, p1 - p0, a + r0 * x.a_row + p0 * x.a_col, x.a_row,
                               x.a_col, b.data() + p0 * np, np, target + (s * x.m + r0) * np,
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
