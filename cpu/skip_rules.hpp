// The skip-rule functors of gpu/skip_rules.cuh (one definition, shared with the CUDA kernels)
// and the CPU's map from a functor name to a template instance, through that header's
// PSA_SKIP_RULES list.
#pragma once

#include <cstring>
#include <stdexcept>
#include <string>

#include "../gpu/skip_rules.cuh"

namespace psa {

// Calls kernel.template operator()<Rule>() with Rule the functor named `functor` (its C++
// name, e.g. "psa::BlasstRule", as pysparse_attn._rules.SkipRule.functor spells it).
template <typename Kernel>
void dispatch_rule(const char* functor, Kernel&& kernel) {
#define PSA_DISPATCH_RULE(Name) \
    if (std::strcmp(functor, "psa::" #Name) == 0) return kernel.template operator()<Name>();
    PSA_SKIP_RULES(PSA_DISPATCH_RULE)
#undef PSA_DISPATCH_RULE
    throw std::invalid_argument(std::string("unknown skip-rule functor ") + functor);
}

}  // namespace psa
