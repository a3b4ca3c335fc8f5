// Run a kernel template for the element type named by a DTypeCode.
#pragma once

#include <stdexcept>

#include "dtypes.hpp"

namespace psa {

// Calls kernel.template operator()<In>() with In the element type of `dtype`.
template <typename Kernel>
void dispatch_dtype(int dtype, Kernel&& kernel) {
    switch (dtype) {
        case DTYPE_F32: kernel.template operator()<float>(); break;
        case DTYPE_F64: kernel.template operator()<double>(); break;
        case DTYPE_F16: kernel.template operator()<Half>(); break;
        case DTYPE_BF16: kernel.template operator()<BFloat16>(); break;
        default: throw std::invalid_argument("unsupported dtype code");
    }
}

}  // namespace psa
