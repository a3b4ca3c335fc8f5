// Thin wrappers over the PTX instructions the kernels use (sm_80+), so that no CUDA header is
// needed: NVRTC and nvcc compile these sources as they are.
#pragma once

namespace psa {

// Shared-memory address of a generic pointer, as the 32-bit operand PTX expects.
__device__ __forceinline__ unsigned shared_address(const void* pointer) {
    unsigned address;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
                 : "=r"(address) : "l"(pointer));
    return address;
}

// 16-byte asynchronous copy global -> shared. `source_bytes` of 0 writes zeros, so padded rows
// of a partial tile are zero-filled without a branch around the copy.
__device__ __forceinline__ void copy_async_16(unsigned destination, const void* source,
                                              int source_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(destination), "l"(source), "r"(source_bytes) : "memory");
}

__device__ __forceinline__ void copy_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void load_matrix_x4(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// Same, transposed: turns row-major V (keys x dims) into the column operand of P.V.
__device__ __forceinline__ void load_matrix_x4_transposed(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// Two adjacent floats added to global memory without a return value (one vector reduction on
// sm_90, where `red.global.add.v2.f32` exists; two scalar reductions before it).
__device__ __forceinline__ void atomic_add_pair(float* address, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n"
                 :: "l"(address), "f"(lo), "f"(hi) : "memory");
#else
    atomicAdd(address, lo);
    atomicAdd(address + 1, hi);
#endif
}

__device__ __forceinline__ float fast_exp2(float x) {
#ifdef PSA_ABLATE_CHEAP_EXP
    // Timing variant only (gpu/attention_forward_sm90.cu lists the ablations): one FMA in place
    // of the MUFU exponential, bounded for the logits it sees (x <= 0).
    return fmaf(x, 0.015625f, 1.f);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// Dynamic shared memory bytes this launch really got (kernels check their layout fits).
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
    unsigned bytes;
    asm volatile("mov.u32 %0, %dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

}  // namespace psa
