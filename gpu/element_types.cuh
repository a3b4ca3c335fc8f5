// The 16-bit element types of the tensor-core path: how to pack fp32 pairs into them and which
// mma.sync instruction multiplies them. Values travel as raw 16-bit words (unsigned short).
#pragma once

namespace psa {

struct Bf16 {
    __device__ static __forceinline__ float to_float(unsigned short bits) {
        return __uint_as_float(static_cast<unsigned>(bits) << 16);
    }
    // Low half from `lo`, high half from `hi` (the order mma operands expect in a register).
    __device__ static __forceinline__ unsigned pack(float lo, float hi) {
        unsigned packed;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
        return packed;
    }
    // D (16x8, fp32) += A (16x16, row) * B (16x8, col).
    __device__ static __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4],
                                               unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

struct Fp16 {
    __device__ static __forceinline__ float to_float(unsigned short bits) {
        float value;
        asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
        return value;
    }
    __device__ static __forceinline__ unsigned pack(float lo, float hi) {
        unsigned packed;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
        return packed;
    }
    __device__ static __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4],
                                               unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

}  // namespace psa
