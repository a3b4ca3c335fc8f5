// Thread-count policy: an explicit count wins, otherwise OpenMP's default (OMP_NUM_THREADS).
#pragma once

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

}  // namespace psa
