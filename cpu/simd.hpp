// Portable SIMD vectors (GCC/Clang vector extensions) and the vectorised exponential.
//
// The vector width follows the target the extension is compiled for (setup.py passes
// -march=native unless PYSPARSE_ATTN_PORTABLE=1): 64 bytes with AVX-512, 32 with AVX, 16
// otherwise. A width the target lacks would be split by the compiler into narrower halves and
// spill registers: measured 3-5 GFLOP/s instead of ~85 on one core when 64-byte vectors were
// compiled for AVX2, hence the choice at compile time rather than one fixed width.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace psa {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T>
struct Simd {
    typedef T vec __attribute__((vector_size(kVectorBytes)));
    static constexpr int lanes = kVectorBytes / static_cast<int>(sizeof(T));
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

// exp(x) for float lanes, about 2 ulp on [-87, 88] (Cephes' polynomial on the reduced
// argument); anything at or below -87.3, including -inf, gives exactly 0, which is what masked
// logits and an initial running max of -inf need.
inline Vec<float> exp_vec(Vec<float> x) {
    const Vec<float> lo = splat(-87.33654f);
    x = x < lo ? lo : x;
    typedef int32_t ivec __attribute__((vector_size(kVectorBytes)));
    const ivec underflow = x <= lo;
    const Vec<float> hi = splat(88.72283f);
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

// exp(x) for float64 lanes: libm per lane (the float64 path favours accuracy over speed).
inline Vec<double> exp_vec(Vec<double> x) {
    for (int i = 0; i < Simd<double>::lanes; ++i) x[i] = std::exp(x[i]);
    return x;
}

template <typename T>
inline Vec<T> max_vec(Vec<T> a, Vec<T> b) {
    return a > b ? a : b;
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

// row[j] <- exp(row[j] - shift[j]) for j < n (n a multiple of the lane count); a shift of
// +inf gives 0 (the backward's padded query columns).
inline void exp_shift_columns(float* row, const float* shift, int64_t n) {
    for (int64_t j = 0; j < n; j += Simd<float>::lanes)
        store_vec(row + j, exp_vec(load_vec(row + j) - load_vec(shift + j)));
}

inline void exp_shift_columns(double* row, const double* shift, int64_t n) {
    for (int64_t j = 0; j < n; ++j) row[j] = std::exp(row[j] - shift[j]);
}

}  // namespace psa
