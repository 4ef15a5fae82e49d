// Fused elementwise chains: bias + activation forward (y = act(x + bias)) and its backward
// (dx = dy * act'(y), written with the output y as forward keeps it). x, y (R, C) C-contiguous,
// bias (C,) or absent (has_bias = 0; then the bias pointer is not read). Rows on blockIdx.y.
// Activation codes: common.cuh DT_ACT_* = wrappers.ACTIVATIONS.
// Reference: kernels_numpy.bias_act_forward / bias_act_backward (and sigmoid).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void bias_act_forward_impl(const T* __restrict__ x, const T* __restrict__ bias,
                                                      T* __restrict__ y, dt_index n_rows, dt_index n_cols,
                                                      int act, int has_bias) {
    DT_FOR_EACH_ROW(row, n_rows) {
        const dt_index base = row * n_cols;
        DT_FOR_EACH_COL(col, n_cols) {
            const T v = has_bias ? x[base + col] + bias[col] : x[base + col];
            y[base + col] = dt_activate(v, act);
        }
    }
}

template <typename T>
__device__ __forceinline__ void bias_act_backward_impl(const T* __restrict__ dy, const T* __restrict__ y,
                                                       T* __restrict__ dx, dt_index n, int act) {
    DT_FOR_EACH(i, n) dx[i] = dy[i] * dt_activation_grad(y[i], act);
}

#define DT_ELEMENTWISE_KERNELS(T, S)                                                                         \
    extern "C" __global__ void DT_BOUNDS                                                   \
        bias_act_forward_##S(const T* x, const T* bias, T* y, dt_index n_rows, dt_index n_cols, int act,     \
                             int has_bias) {                                                                 \
        bias_act_forward_impl<T>(x, bias, y, n_rows, n_cols, act, has_bias);                                 \
    }                                                                                                        \
    extern "C" __global__ void DT_BOUNDS                                                   \
        bias_act_backward_##S(const T* dy, const T* y, T* dx, dt_index n, int act) {                         \
        bias_act_backward_impl<T>(dy, y, dx, n, act);                                                        \
    }
DT_FOR_FLOATS(DT_ELEMENTWISE_KERNELS)
