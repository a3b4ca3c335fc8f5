// Element types of the inputs and their conversion to and from the accumulation type.
//
// float16 and bfloat16 are carried as raw 16-bit patterns and widened to float32 one tile row
// at a time (never a whole tensor up front); outputs are narrowed with round-to-nearest-even,
// the rounding NumPy and ml_dtypes use for astype.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace psa {

// Codes shared with the Cython wrapper (_cpu.pyx).
enum DTypeCode : int { DTYPE_F32 = 0, DTYPE_F64 = 1, DTYPE_F16 = 2, DTYPE_BF16 = 3 };

struct Half {
    uint16_t bits;
};

struct BFloat16 {
    uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

inline uint32_t float_to_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    return bits;
}

// IEEE binary16 <-> binary32 without F16C, branch-free so loops over rows vectorise
// (after M. Dukhan's FP16 library, MIT licence).
inline float half_to_float(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result =
        sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
    return bits_to_float(result);
}

inline uint16_t float_to_half(float f) {
    const float to_inf = 0x1.0p+112f, to_zero = 0x1.0p-110f;
    float base = (std::fabs(f) * to_inf) * to_zero;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bfloat16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bfloat16(float f) {
    uint32_t bits = float_to_bits(f);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// widen<T>(x): input element -> accumulation type T.
template <typename T> inline T widen(float x) { return static_cast<T>(x); }
template <typename T> inline T widen(double x) { return static_cast<T>(x); }
template <typename T> inline T widen(Half x) { return static_cast<T>(half_to_float(x.bits)); }
template <typename T> inline T widen(BFloat16 x) {
    return static_cast<T>(bfloat16_to_float(x.bits));
}

// narrow(x, out): accumulation value -> output element.
inline void narrow(float x, float* out) { *out = x; }
inline void narrow(double x, double* out) { *out = x; }
inline void narrow(double x, float* out) { *out = static_cast<float>(x); }
inline void narrow(float x, Half* out) { out->bits = float_to_half(x); }
inline void narrow(float x, BFloat16* out) { out->bits = float_to_bfloat16(x); }

// The accumulation type of each input type: float64 stays float64, the rest use float32.
template <typename In> struct AccumulatorOf { typedef float type; };
template <> struct AccumulatorOf<double> { typedef double type; };

}  // namespace psa
