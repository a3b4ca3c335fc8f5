// Shared-memory mbarriers (sm_90): the stage handshakes of the warp-specialised forward.
//
// A barrier counts arrivals (and, for TMA stages, transaction bytes); when both reach their
// targets its phase completes and its parity flips. A waiter names the parity of the phase it
// needs: round r of a stage waits for parity r & 1. Every wait is bounded: a protocol bug
// traps (an illegal-instruction error the host sees) instead of hanging the device.
#pragma once

namespace psa {

__device__ __forceinline__ void mbarrier_init(unsigned barrier, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(barrier), "r"(arrivals)
                 : "memory");
}

// Makes initialised barriers visible to the asynchronous proxy (TMA) before first use.
__device__ __forceinline__ void mbarrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival (release: this thread's earlier shared-memory writes are visible to whoever
// observes the completed phase).
__device__ __forceinline__ void mbarrier_arrive(unsigned barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(barrier) : "memory");
}

// One arrival that also announces `bytes` of TMA transactions for the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(unsigned barrier, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 :: "r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ bool mbarrier_try_wait(unsigned barrier, unsigned parity) {
    unsigned done;
    asm volatile("{ .reg .pred p;\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p; }\n"
                 : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
    return done != 0;
}

// The most polls a wait may take: legitimate waits here last microseconds (a few tiles of
// another warp's work; milliseconds under compute-sanitizer), far below 2^26 polls, so a wait
// that reaches it means the protocol is broken. A bound on polls alone, not on the clock:
// reading %globaltimer inside the wait made ptxas allocate every role of the warp-specialised
// forward within the launch bound's 168 registers, ignoring the consumers' setmaxnreg budget
// (measured with nvcc 13.0: spills at R165 with the clock, none at R173 without).
constexpr unsigned kWaitMaxPolls = 1u << 26;

// Wait (acquire) until the phase of parity `parity` has completed; trap when it never does.
__device__ __forceinline__ void mbarrier_wait(unsigned barrier, unsigned parity) {
    for (unsigned polls = 0; polls < kWaitMaxPolls; ++polls)
        if (mbarrier_try_wait(barrier, parity)) return;
    __trap();
}

}  // namespace psa
