// LayerNorm over the rows of x (R, n), a warp per row (launch.warp_rows_config):
//   forward:  mean and variance by two warp sums over the row, then y = (x - mean) rstd weight + bias;
//             each row's mean and rstd = 1 / sqrt(var + eps) written out for backward.
//   backward: the row's sums of g and g xhat (g = grad_y weight, xhat = (x - mean) rstd) by warp sums,
//             then grad_x = rstd (g - mean(g) - xhat mean(g xhat)).
//   layer_norm_param_grads: a thread per column sums grad_y xhat (the weight's gradient) and grad_y (the
//             bias's) over the rows, in row order.
// weight, bias: has_weight / has_bias = 0 means none (the pointer is not read).
// Reference: kernels_numpy.layer_norm_forward / layer_norm_backward.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void layer_norm_forward_impl(const T* __restrict__ x, const T* __restrict__ weight,
                                                        const T* __restrict__ bias, double eps, T* __restrict__ y,
                                                        T* __restrict__ mean, T* __restrict__ rstd, dt_index n_rows,
                                                        dt_index n, int has_weight, int has_bias) {
    const int lane = threadIdx.x % DT_WARP;
    DT_FOR_EACH_WARP_ROW(row, n_rows) {
        const T* xr = x + row * n;
        T sum = T(0);
        for (dt_index col = lane; col < n; col += DT_WARP) sum += xr[col];
        const T mu = dt_warp_sum(sum) / T(n);
        T squares = T(0);
        for (dt_index col = lane; col < n; col += DT_WARP) squares += (xr[col] - mu) * (xr[col] - mu);
        const T inv = T(1) / dt_sqrt(dt_warp_sum(squares) / T(n) + T(eps));
        if (lane == 0) {
            mean[row] = mu;
            rstd[row] = inv;
        }
        for (dt_index col = lane; col < n; col += DT_WARP) {
            T v = (xr[col] - mu) * inv;
            if (has_weight) v *= weight[col];
            y[row * n + col] = has_bias ? v + bias[col] : v;
        }
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_backward_impl(const T* __restrict__ grad_y, const T* __restrict__ x,
                                                         const T* __restrict__ weight, const T* __restrict__ mean,
                                                         const T* __restrict__ rstd, T* __restrict__ grad_x,
                                                         dt_index n_rows, dt_index n, int has_weight) {
    const int lane = threadIdx.x % DT_WARP;
    DT_FOR_EACH_WARP_ROW(row, n_rows) {
        const dt_index base = row * n;
        const T mu = mean[row], inv = rstd[row];
        T g_sum = T(0), gx_sum = T(0);
        for (dt_index col = lane; col < n; col += DT_WARP) {
            const T g = has_weight ? grad_y[base + col] * weight[col] : grad_y[base + col];
            g_sum += g;
            gx_sum += g * ((x[base + col] - mu) * inv);
        }
        const T g_mean = dt_warp_sum(g_sum) / T(n), gx_mean = dt_warp_sum(gx_sum) / T(n);
        for (dt_index col = lane; col < n; col += DT_WARP) {
            const T g = has_weight ? grad_y[base + col] * weight[col] : grad_y[base + col];
            grad_x[base + col] = (g - g_mean - (x[base + col] - mu) * inv * gx_mean) * inv;
        }
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_param_grads_impl(const T* __restrict__ grad_y, const T* __restrict__ x,
                                                            const T* __restrict__ mean, const T* __restrict__ rstd,
                                                            T* __restrict__ grad_weight, T* __restrict__ grad_bias,
                                                            dt_index n_rows, dt_index n, int with_weight,
                                                            int with_bias) {
    DT_FOR_EACH(col, n) {
        T w = T(0), b = T(0);
        for (dt_index row = 0; row < n_rows; ++row) {
            const T g = grad_y[row * n + col];
            w += g * ((x[row * n + col] - mean[row]) * rstd[row]);
            b += g;
        }
        if (with_weight) grad_weight[col] = w;
        if (with_bias) grad_bias[col] = b;
    }
}

#define DT_LAYER_NORM_KERNELS(T, S)                                                                           \
    extern "C" __global__ void DT_BOUNDS layer_norm_forward_##S(const T* x, const T* weight, const T* bias,   \
                                                                double eps, T* y, T* mean, T* rstd,           \
                                                                dt_index n_rows, dt_index n, int has_weight,  \
                                                                int has_bias) {                               \
        layer_norm_forward_impl<T>(x, weight, bias, eps, y, mean, rstd, n_rows, n, has_weight, has_bias);     \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS layer_norm_backward_##S(const T* grad_y, const T* x, const T* weight, \
                                                                 const T* mean, const T* rstd, T* grad_x,     \
                                                                 dt_index n_rows, dt_index n,                 \
                                                                 int has_weight) {                            \
        layer_norm_backward_impl<T>(grad_y, x, weight, mean, rstd, grad_x, n_rows, n, has_weight);            \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS layer_norm_param_grads_##S(const T* grad_y, const T* x,              \
                                                                    const T* mean, const T* rstd,             \
                                                                    T* grad_weight, T* grad_bias,             \
                                                                    dt_index n_rows, dt_index n,              \
                                                                    int with_weight, int with_bias) {         \
        layer_norm_param_grads_impl<T>(grad_y, x, mean, rstd, grad_weight, grad_bias, n_rows, n, with_weight, \
                                       with_bias);                                                            \
    }
DT_FOR_FLOATS(DT_LAYER_NORM_KERNELS)
