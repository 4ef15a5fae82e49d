// exp, tanh and sigmoid for float32 that GCC vectorises: arithmetic, bit casts and selects only, no libm call
// and no branch, so a `#pragma omp simd` loop over them becomes AVX-512 / AVX2 / SSE code. libm's
// expf/tanhf are scalar calls, and glibc's vector variants (libmvec) are only used under -ffast-math,
// which would also reorder sums and drop NaN handling everywhere. float64 (the gradient-check path,
// where speed does not matter) calls libm.
//
// Both are the Cephes single-precision algorithms (S. L. Moshier, www.netlib.org/cephes):
//   exp:  x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial, times 2^n from the exponent bits;
//         relative error about 1 ulp; below -87.33 (2^-126) the result is 0, above 88.72 it is inf.
//   tanh: |x| < 0.625: x + x^3 P(x^2) (degree-4 P); else sign(x) (1 - 2 / (exp(2|x|) + 1));
//         about 2 ulp relative.
// NaN in gives NaN out (every select keeps x when a comparison with NaN is false).
#ifndef DISTTRAIN_SIMD_MATH_H
#define DISTTRAIN_SIMD_MATH_H

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dt {

static inline float bits_to_float(int32_t i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}

// exp for x <= 0, or NaN (the row sums of a softmax or cross-entropy, shifted by the row's maximum): exp_f32
// without the overflow side, the same bits there. A positive x gives garbage.
static inline float exp_nonpositive_f32(float x) {
    const float lo = -87.33654022216797f;
    const float xc = x < lo ? lo : x;
    // n = round(x / ln2) by adding 1.5 * 2^23: n is then the low bits of the sum's mantissa, read with a bit cast,
    // where a float-to-int conversion would need a guard for NaN (exact for |n| < 2^22)
    const float shifter = 12582912.0f;
    const float shifted = xc * 1.44269504088896341f + shifter;
    const float n = shifted - shifter;
    float r = xc - n * 0.693359375f;   // ln2 in two parts: the first has few bits, so n * it is exact
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    // 2^n: n + 127 in the exponent bits (unsigned arithmetic: defined for any bits, NaN's too, where p is NaN)
    const uint32_t n_bits = float_to_bits(shifted) - float_to_bits(shifter);
    const float scale = bits_to_float(static_cast<int32_t>((n_bits + 127u) << 23));
    const float y = p * scale;
    return x < lo ? 0.0f : y;
}

static inline float exp_f32(float x) {
    const float hi = 88.72283935546875f;
    const float y = exp_nonpositive_f32(x > hi ? hi : x);
    return x > hi ? INFINITY : y;
}

static inline float tanh_f32(float x) {
    float z = std::fabs(x);
    // small |x|: the odd polynomial (1 - 2/(e^2z + 1) would cancel digits there)
    float s = x * x;
    float p = -5.70498872745e-3f;
    p = p * s + 2.06390887954e-2f;
    p = p * s - 5.37397155531e-2f;
    p = p * s + 1.33314422036e-1f;
    p = p * s - 3.33332819422e-1f;
    float small = p * s * x + x;
    float large = 1.0f - 2.0f / (exp_f32(2.0f * z) + 1.0f);
    large = x < 0.0f ? -large : large;
    return z >= 0.625f ? large : small;
}

// sigmoid(x) = 1 / (1 + exp(-x)): one exp and one division, about 2 ulp; 0 below x = -88.7 (exp(-x) is
// inf there) and 1 above 17 (exp(-x) under half an ulp of 1)
static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

template <typename T> static inline T exp_(T x);
template <> inline float exp_<float>(float x) { return exp_f32(x); }
template <> inline double exp_<double>(double x) { return std::exp(x); }

template <typename T> static inline T exp_nonpositive_(T x);
template <> inline float exp_nonpositive_<float>(float x) { return exp_nonpositive_f32(x); }
template <> inline double exp_nonpositive_<double>(double x) { return std::exp(x); }

template <typename T> static inline T tanh_(T x);
template <> inline float tanh_<float>(float x) { return tanh_f32(x); }
template <> inline double tanh_<double>(double x) { return std::tanh(x); }

// float64 keeps the NumPy kernels' form, tanh(x / 2) / 2 + 1/2, digit for digit (the gradient checks' dtype)
template <typename T> static inline T sigmoid_(T x);
template <> inline float sigmoid_<float>(float x) { return sigmoid_f32(x); }
template <> inline double sigmoid_<double>(double x) { return std::tanh(x * 0.5) * 0.5 + 0.5; }

}  // namespace dt

#endif
