// The in-loop skip rules of DESIGN.md section 5 as small functors, one per rule code of the
// backend contract. Thresholds arrive already converted to log2 units where the rule compares
// logs (the host multiplies ln-thresholds by log2(e)), because the kernel's logits are log2.
//
//   may_skip(tile_max2, max2, sum, skipped, added, param): may this row skip the tile?
//   kNeedsRowSum: the rule reads the full row sum, so it must be reduced every tile.
//   kExactMass:   `added` must be the exact tile mass rather than the bound nJ * exp(mt - m).
#pragma once

namespace psa {

struct NoSkip {
    static constexpr int kCode = 0;
    static constexpr bool kCanSkip = false;
    static constexpr bool kNeedsRowSum = false;
    static constexpr bool kExactMass = false;
    __device__ static __forceinline__ bool may_skip(float, float, float, float, float, float) {
        return false;
    }
};

// Blasst(lam): mt - m < ln(lam).
struct BlasstRule {
    static constexpr int kCode = 1;
    static constexpr bool kCanSkip = true;
    static constexpr bool kNeedsRowSum = false;
    static constexpr bool kExactMass = false;
    __device__ static __forceinline__ bool may_skip(float tile_max2, float max2, float, float,
                                                    float, float log2_lam) {
        return tile_max2 - max2 < log2_lam;
    }
};

// Cef(lam): mt - (m + ln l) < lam.
struct CefRule {
    static constexpr int kCode = 2;
    static constexpr bool kCanSkip = true;
    static constexpr bool kNeedsRowSum = true;
    static constexpr bool kExactMass = false;
    __device__ static __forceinline__ bool may_skip(float tile_max2, float max2, float sum, float,
                                                    float, float log2_lam) {
        return tile_max2 - max2 - __log2f(sum) < log2_lam;
    }
};

// Recall(R): u + nJ exp(mt - m) <= ((1 - R) / R) l; R = 1 (param 0) never skips.
struct RecallRule {
    static constexpr int kCode = 3;
    static constexpr bool kCanSkip = true;
    static constexpr bool kNeedsRowSum = true;
    static constexpr bool kExactMass = false;
    __device__ static __forceinline__ bool may_skip(float, float, float sum, float skipped,
                                                    float added, float ratio) {
        const float limit = ratio * sum;
        return limit > 0.f && skipped + added <= limit;
    }
};

// Recall(R, exact=True): the same test on the tile's exact row sums.
struct RecallExactRule : RecallRule {
    static constexpr int kCode = 4;
    static constexpr bool kExactMass = true;
};

}  // namespace psa
