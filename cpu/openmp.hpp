// Thread-count policy: an explicit count wins, otherwise OpenMP's default (OMP_NUM_THREADS).
#pragma once

#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace psa {

inline int thread_count(int requested) {
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

// Index of the calling thread inside a parallel region (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// One workspace per thread, allocated before the parallel region: an allocation failure then
// surfaces as an exception in the caller's thread (MemoryError in Python) instead of
// terminating the process from inside OpenMP.
template <typename Workspace, typename... Args>
std::vector<Workspace> per_thread(int threads, const Args&... args) {
    std::vector<Workspace> workspaces;
    workspaces.reserve(threads);
    for (int t = 0; t < threads; ++t) workspaces.emplace_back(args...);
    return workspaces;
}

}  // namespace psa
