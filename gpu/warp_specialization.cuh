// Warp specialisation on sm_90: register reallocation between warpgroups, the named-barrier
// vote of one warpgroup and the named-barrier hand-off between two.
#pragma once

namespace psa {

// Give registers back (producer warpgroup) or take them (consumer warpgroups); every thread of
// the warpgroup executes it. REGISTERS: a multiple of 8 in [24, 256].
template <int REGISTERS>
__device__ __forceinline__ void warpgroup_release_registers() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGISTERS));
}

template <int REGISTERS>
__device__ __forceinline__ void warpgroup_claim_registers() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGISTERS));
}

// AND of `predicate` over the 128 threads of one warpgroup, through named barrier `barrier`
// (1..15; 0 is __syncthreads). Only that warpgroup's threads take part.
__device__ __forceinline__ bool warpgroup_all(bool predicate, unsigned barrier) {
    unsigned result;
    asm volatile("{ .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n"
                 "bar.red.and.pred q, %2, 128, p;\n selp.u32 %0, 1, 0, q; }\n"
                 : "=r"(result) : "r"((unsigned)predicate), "r"(barrier) : "memory");
    return result != 0;
}

// Named-barrier halves of a hand-off between two warpgroups: `threads` counts both sides (256),
// one side waits (`named_barrier_sync`), the other signals without waiting
// (`named_barrier_arrive`). Every arrival must be matched by a sync before the CTA exits.
__device__ __forceinline__ void named_barrier_sync(unsigned barrier, unsigned threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(barrier), "r"(threads) : "memory");
}

// The same with the barrier fixed at compile time (a register operand makes ptxas reserve all 16).
template <unsigned BARRIER>
__device__ __forceinline__ void named_barrier_sync(unsigned threads) {
    asm volatile("bar.sync %0, %1;\n" :: "n"(BARRIER), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(unsigned barrier, unsigned threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(barrier), "r"(threads) : "memory");
}

}  // namespace psa
