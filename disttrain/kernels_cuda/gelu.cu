// GELU forward and backward, one elementwise pass each, tanh form; backward recomputes the activation from
// forward's input x. Written as x sigmoid(2u) = x / (1 + exp(-2u)), u = s (x + k x^3), the same value as
// 0.5 x (1 + tanh(u)) without the digits 1 + tanh(u) loses where tanh(u) is near -1 (the CPU's compiled
// kernel does the same, kernels_cpu/native.cpp).
// Reference: kernels_numpy.gelu_forward / gelu_backward.
// The exact GELU, x Phi(x) with Phi(x) = 0.5 erfc(-x / sqrt 2) (erfc: Phi's relative accuracy in the left
// tail), forward and backward the same way; reference: kernels_numpy.gelu_erf_forward / gelu_erf_backward.
#include "common.cuh"

#define DT_GELU_SCALE 0.7978845608028654  // sqrt(2 / pi), kernels_numpy.GELU_SCALE
#define DT_GELU_CUBIC 0.044715

// exp(-2u) of x
template <typename T> __device__ __forceinline__ T gelu_exp_minus_2u(T v) {
    return dt_exp(T(-2 * DT_GELU_SCALE) * (v * (v * v * T(DT_GELU_CUBIC) + T(1))));
}

template <typename T>
__device__ __forceinline__ void gelu_forward_impl(const T* __restrict__ x, T* __restrict__ y, dt_index n) {
    DT_FOR_EACH(i, n) {
        const T v = x[i];
        y[i] = v / (T(1) + gelu_exp_minus_2u(v));
    }
}

// sigmoid(2u) + 2 x u' sigmoid(2u) (1 - sigmoid(2u)), u' = s (1 + 3 k x^2), with 1 - sigmoid(2u) taken as
// e sigmoid(2u) (e = exp(-2u)): the subtraction would keep only the ulps of 1 where x >> 0
template <typename T>
__device__ __forceinline__ void gelu_backward_impl(const T* __restrict__ grad_y, const T* __restrict__ x,
                                                   T* __restrict__ grad_x, dt_index n) {
    DT_FOR_EACH(i, n) {
        const T v = x[i];
        const T e = gelu_exp_minus_2u(v);
        const T sig = T(1) / (T(1) + e);
        T rest = e * sig;
        rest = rest == rest ? rest : T(0);  // e = inf (x << 0): sig = 0, and so is the product
        const T slope = T(2 * DT_GELU_SCALE) * (v * v * T(3 * DT_GELU_CUBIC) + T(1)) * v;
        grad_x[i] = grad_y[i] * (sig + slope * sig * rest);
    }
}

#define DT_SQRT1_2 0.7071067811865476
#define DT_INV_SQRT_2PI 0.3989422804014327  // kernels_numpy.INV_SQRT_2PI

template <typename T> __device__ __forceinline__ T normal_cdf(T v) { return T(0.5) * dt_erfc(-v * T(DT_SQRT1_2)); }

template <typename T>
__device__ __forceinline__ void gelu_erf_forward_impl(const T* __restrict__ x, T* __restrict__ y, dt_index n) {
    DT_FOR_EACH(i, n) {
        const T v = x[i];
        y[i] = v * normal_cdf(v);
    }
}

// grad_y (Phi(x) + x phi(x)), phi the normal density
template <typename T>
__device__ __forceinline__ void gelu_erf_backward_impl(const T* __restrict__ grad_y, const T* __restrict__ x,
                                                       T* __restrict__ grad_x, dt_index n) {
    DT_FOR_EACH(i, n) {
        const T v = x[i];
        grad_x[i] = grad_y[i] * (normal_cdf(v) + v * dt_exp(T(-0.5) * v * v) * T(DT_INV_SQRT_2PI));
    }
}

#define DT_GELU_KERNELS(T, S)                                                                                 \
    extern "C" __global__ void DT_BOUNDS gelu_forward_##S(const T* x, T* y, dt_index n) {                     \
        gelu_forward_impl<T>(x, y, n);                                                                        \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS gelu_backward_##S(const T* grad_y, const T* x, T* grad_x, dt_index n) { \
        gelu_backward_impl<T>(grad_y, x, grad_x, n);                                                          \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS gelu_erf_forward_##S(const T* x, T* y, dt_index n) {                 \
        gelu_erf_forward_impl<T>(x, y, n);                                                                    \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS gelu_erf_backward_##S(const T* grad_y, const T* x, T* grad_x,        \
                                                               dt_index n) {                                  \
        gelu_erf_backward_impl<T>(grad_y, x, grad_x, n);                                                      \
    }
DT_FOR_FLOATS(DT_GELU_KERNELS)
