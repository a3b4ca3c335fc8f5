// The SLA feature maps phi (softmax over the head dimension, elu + 1, relu) and their
// vector-Jacobian products, applied row by row to contiguous tile buffers.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.hpp"

namespace psa {

// phi[d] = phi(x)[d] for d < dim (one row).
template <typename T>
inline void feature_map_row(int map, const T* x, T* phi, int64_t dim) {
    switch (map) {
        case FEATURE_SOFTMAX: {
            T top = x[0];
            for (int64_t d = 1; d < dim; ++d) top = x[d] > top ? x[d] : top;
            T sum = 0;
            for (int64_t d = 0; d < dim; ++d) sum += phi[d] = std::exp(x[d] - top);
            const T inv = T(1) / sum;
            for (int64_t d = 0; d < dim; ++d) phi[d] *= inv;
            break;
        }
        case FEATURE_ELU1:
            for (int64_t d = 0; d < dim; ++d) phi[d] = x[d] > 0 ? x[d] + T(1) : std::exp(x[d]);
            break;
        default:
            for (int64_t d = 0; d < dim; ++d) phi[d] = x[d] > 0 ? x[d] : T(0);
            break;
    }
}

// dx[d] = (d phi / d x)^T d_phi for one row, given x and phi(x).
template <typename T>
inline void feature_map_vjp_row(int map, const T* x, const T* phi, const T* d_phi, T* dx,
                                int64_t dim) {
    switch (map) {
        case FEATURE_SOFTMAX: {
            T dot = 0;
            for (int64_t d = 0; d < dim; ++d) dot += d_phi[d] * phi[d];
            for (int64_t d = 0; d < dim; ++d) dx[d] = phi[d] * (d_phi[d] - dot);
            break;
        }
        case FEATURE_ELU1:
            for (int64_t d = 0; d < dim; ++d) dx[d] = d_phi[d] * (x[d] > 0 ? T(1) : phi[d]);
            break;
        default:
            for (int64_t d = 0; d < dim; ++d) dx[d] = x[d] > 0 ? d_phi[d] : T(0);
            break;
    }
}

}  // namespace psa
