// The in-loop skip rules of docs/design.rst section 5, one functor type per rule, shared by the CPU
// (cpu/forward.cpp, through cpu/skip_rules.hpp) and the CUDA kernels. The Python side names
// each functor (pysparse_attn/_rules.py: `SkipRule.functor`) and passes one float parameter per
// query head in natural-log units (`SkipRule.kernel_params`).
//
// A rule type holds only compile-time traits and its predicate; `BoundRule<Rule, Units, T>` is
// the functor a kernel calls: the rule with the parameter of one head, in the kernel's log
// units. The CPU works in natural logs, the GPU in log2 (its logits are pre-multiplied by
// log2 e so that every exponential is one exp2): the one conversion between the two is in
// `BoundRule`'s constructor.
//
//   may_skip(tile_max, max, sum, skipped, added, param): may this row skip the tile?
//     tile_max: the tile's row max; max, sum: the running max and sum (sum in the frame of
//     max); skipped: bound on the mass skipped so far (same frame); added: the tile's mass
//     bound nJ * exp(tile_max - max), or its exact row mass for kExactMass rules.
//   kCanSkip: the rule ever skips (NoSkip does not: kernels drop the whole decision).
//   kNeedsRowSum: the rule reads the full row sum, so it must be reduced every tile.
//   kExactMass: `added` must be the exact tile mass rather than the bound.
//   kLogParam: the parameter is a logarithm, converted to the kernel's log units.
//
// A new rule: a struct here, its name in PSA_SKIP_RULES, and its Python class in _rules.py.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PSA_HOST_DEVICE __device__ __forceinline__
#else
#include <cmath>
#define PSA_HOST_DEVICE inline
#endif

namespace psa {

// Every rule functor, as X(type name): the CPU maps a functor name to a template instance
// through this list (cpu/skip_rules.hpp); the CUDA instance tables list the same names
// (pysparse_attn/backends/cupy.py, from _rules.ALL_FUNCTORS).
#define PSA_SKIP_RULES(X) X(NoSkip) X(BlasstRule) X(CefRule) X(RecallRule) X(RecallExactRule)

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// GPU logits: log2 units (scaled by log2 e).
struct Log2Units {
    static constexpr float kPerNat = 1.4426950408889634f;
    __device__ static __forceinline__ float log(float x) { return __log2f(x); }
};
#else
// CPU logits: natural-log units.
struct NaturalLogUnits {
    static constexpr double kPerNat = 1.0;
    template <typename T>
    static inline T log(T x) { return std::log(x); }
};
#endif

struct NoSkip {
    static constexpr bool kCanSkip = false;
    static constexpr bool kNeedsRowSum = false;
    static constexpr bool kExactMass = false;
    static constexpr bool kLogParam = false;
    template <class Units, typename T>
    PSA_HOST_DEVICE static bool may_skip(T, T, T, T, T, T) { return false; }
};

// Blasst(lam): tile_max - max < ln(lam).
struct BlasstRule {
    static constexpr bool kCanSkip = true;
    static constexpr bool kNeedsRowSum = false;
    static constexpr bool kExactMass = false;
    static constexpr bool kLogParam = true;
    template <class Units, typename T>
    PSA_HOST_DEVICE static bool may_skip(T tile_max, T max, T, T, T, T log_lam) {
        return tile_max - max < log_lam;
    }
};

// Cef(lam): tile_max - (max + ln sum) < lam.
struct CefRule {
    static constexpr bool kCanSkip = true;
    static constexpr bool kNeedsRowSum = true;
    static constexpr bool kExactMass = false;
    static constexpr bool kLogParam = true;
    template <class Units, typename T>
    PSA_HOST_DEVICE static bool may_skip(T tile_max, T max, T sum, T, T, T lam) {
        return tile_max - max - Units::log(sum) < lam;
    }
};

// Recall(R): skipped + added <= ((1 - R) / R) sum; R = 1 (ratio 0) never skips. The `limit > 0`
// test also keeps float32 from skipping once exp(tile_max - max) underflows to 0, where
// "skipped + added <= 0" would pass although the tile has mass.
struct RecallRule {
    static constexpr bool kCanSkip = true;
    static constexpr bool kNeedsRowSum = true;
    static constexpr bool kExactMass = false;
    static constexpr bool kLogParam = false;
    template <class Units, typename T>
    PSA_HOST_DEVICE static bool may_skip(T, T, T sum, T skipped, T added, T ratio) {
        const T limit = ratio * sum;
        return limit > T(0) && skipped + added <= limit;
    }
};

// Recall(R, exact=True): the same test on the tile's exact row mass.
struct RecallExactRule : RecallRule {
    static constexpr bool kExactMass = true;
};

// A rule with the parameter of one head, in the kernel's units: what a tile loop calls.
// `params` holds one natural-log-unit value per query head (SkipRule.kernel_params).
template <class Rule, class Units, typename T>
struct BoundRule {
    T param;

    template <typename P>
    PSA_HOST_DEVICE BoundRule(const P* params, int head)
        : param(Rule::kCanSkip ? static_cast<T>(Rule::kLogParam
                                                    ? params[head] * static_cast<P>(Units::kPerNat)
                                                    : params[head])
                               : T(0)) {}

    PSA_HOST_DEVICE bool operator()(T tile_max, T max, T sum, T skipped, T added) const {
        return Rule::template may_skip<Units, T>(tile_max, max, sum, skipped, added, param);
    }
};

}  // namespace psa
