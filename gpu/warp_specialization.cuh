// Warp specialisation on sm_90: register reallocation between warpgroups and the named-barrier
// vote of one warpgroup.
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

// Shared memory bytes this launch really got (the kernel checks its layout fits).
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
    unsigned bytes;
    asm volatile("mov.u32 %0, %dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

}  // namespace psa
