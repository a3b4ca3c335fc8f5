// Portable 512-bit vectors (GCC/Clang vector extensions) and the vectorised exponential.
//
// The vector width is fixed at 64 bytes: with -march=native on an AVX-512 machine each vector
// is one zmm register; on AVX2 the compiler splits it in two ymm halves, so the same source
// serves both without intrinsics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace psa {

template <typename T>
struct Simd {
    typedef T vec __attribute__((vector_size(64)));
    static constexpr int lanes = 64 / static_cast<int>(sizeof(T));
};

template <typename T>
using Vec = typename Simd<T>::vec;

template <typename T>
inline Vec<T> load_vec(const T* p) {
    Vec<T> v;
    std::memcpy(&v, p, sizeof(v));  // unaligned load; compiles to a single vmovups
    return v;
}

template <typename T>
inline void store_vec(T* p, Vec<T> v) {
    std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> splat(T x) {
    return Vec<T>{} + x;
}

// Round up to a whole number of vectors of T.
template <typename T>
inline int64_t round_up_lanes(int64_t n) {
    const int64_t w = Simd<T>::lanes;
    return (n + w - 1) / w * w;
}

// exp(x) for float lanes, about 2 ulp on [-87, 88]; exp of anything at or below -87.3
// (including -inf) is exactly 0, which is what masked logits need.
inline Vec<float> exp_vec(Vec<float> x) {
    typedef int32_t ivec __attribute__((vector_size(64)));
    const Vec<float> lo = splat(-87.33654f), hi = splat(88.72283f);
    const ivec underflow = x < lo;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    // n = round(x / ln 2) by the 1.5 * 2^23 trick: exact for |n| < 2^22, no libm call.
    const Vec<float> magic = splat(12582912.0f);
    Vec<float> n = (x * 1.44269504088896341f + magic) - magic;
    Vec<float> r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    Vec<float> p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    Vec<float> scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    Vec<float> result = p * scale;
    ivec result_bits;
    std::memcpy(&result_bits, &result, sizeof(result_bits));
    result_bits &= ~underflow;
    std::memcpy(&result, &result_bits, sizeof(result));
    return result;
}

// row[j] <- exp(row[j] - shift) for j < n (n a multiple of the lane count); returns the sum.
// Lanes holding -inf become 0. The float path is vectorised; float64 uses libm.
inline float exp_shift_sum(float* row, float shift, int64_t n) {
    Vec<float> total{};
    for (int64_t j = 0; j < n; j += Simd<float>::lanes) {
        Vec<float> e = exp_vec(load_vec(row + j) - shift);
        store_vec(row + j, e);
        total += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < Simd<float>::lanes; ++i) sum += total[i];
    return sum;
}

inline double exp_shift_sum(double* row, double shift, int64_t n) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
        row[j] = std::exp(row[j] - shift);
        sum += row[j];
    }
    return sum;
}

// Sum of exp(row[j] - shift) without storing it (Recall exact's skip test).
inline float sum_exp_shift(const float* row, float shift, int64_t n) {
    Vec<float> total{};
    for (int64_t j = 0; j < n; j += Simd<float>::lanes) total += exp_vec(load_vec(row + j) - shift);
    float sum = 0.0f;
    for (int i = 0; i < Simd<float>::lanes; ++i) sum += total[i];
    return sum;
}

inline double sum_exp_shift(const double* row, double shift, int64_t n) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += std::exp(row[j] - shift);
    return sum;
}

template <typename T>
inline T row_max(const T* row, int64_t n) {
    T best = -INFINITY;
    for (int64_t j = 0; j < n; ++j) best = row[j] > best ? row[j] : best;
    return best;
}

}  // namespace psa
