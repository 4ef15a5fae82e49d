// Softmax over the rows of x (R, n) (the last axis of the scores), optionally causal, and its backward.
//   forward:  one online log-sum-exp pass over the counted entries of a row (all n, or with causal the
//             keys j <= i of query i = row % queries), then y = exp(x - m) / s there and 0 elsewhere;
//             a row whose counted entries are all -inf comes out zeros (s = 0).
//   backward: grad_x = y (grad_y - sum(grad_y y)): the row's dot product (a warp or block sum), then
//             one elementwise pass over the row.
// Two shapes of each, picked by launch.softmax_config: a warp per row for narrow rows (attention
// scores: n = T), a block per row for wide ones. Rows of one block never share memory: warp shapes use
// shuffles only, block shapes dynamic shared memory of 2 * blockDim.x / 32 values.
// Reference: kernels_numpy.softmax_forward / softmax_backward.
#include "common.cuh"

// The number of entries of `row` that count (its query's keys j <= i when causal)
__device__ __forceinline__ dt_index softmax_kept(dt_index row, dt_index n, dt_index queries, int causal) {
    if (!causal) return n;
    const dt_index query = row % queries;
    return query + 1 < n ? query + 1 : n;
}

// y over one row from its (m, s), threads `first` + k * `stride`
template <typename T>
__device__ __forceinline__ void softmax_write_row(const T* __restrict__ x, T* __restrict__ y, dt_index n,
                                                  dt_index kept, T m, T s, dt_index first, dt_index stride) {
    for (dt_index col = first; col < n; col += stride)
        y[col] = (col < kept && s > T(0)) ? dt_exp(x[col] - m) / s : T(0);
}

template <typename T>
__device__ __forceinline__ void softmax_forward_warp_impl(const T* __restrict__ x, T* __restrict__ y,
                                                          dt_index n_rows, dt_index n, dt_index queries,
                                                          int causal) {
    const int lane = threadIdx.x % DT_WARP;
    DT_FOR_EACH_WARP_ROW(row, n_rows) {
        const T* xr = x + row * n;
        const dt_index kept = softmax_kept(row, n, queries, causal);
        T m = dt_neg_inf<T>(), s = T(0);
        for (dt_index col = lane; col < kept; col += DT_WARP) dt_lse_add(m, s, xr[col]);
        dt_warp_lse(m, s);
        softmax_write_row(xr, y + row * n, n, kept, m, s, lane, DT_WARP);
    }
}

template <typename T>
__device__ __forceinline__ void softmax_forward_block_impl(const T* __restrict__ x, T* __restrict__ y,
                                                           dt_index n_rows, dt_index n, dt_index queries,
                                                           int causal) {
    T* scratch = dt_shared<T>();
    for (dt_index row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* xr = x + row * n;
        const dt_index kept = softmax_kept(row, n, queries, causal);
        T m = dt_neg_inf<T>(), s = T(0);
        for (dt_index col = threadIdx.x; col < kept; col += blockDim.x) dt_lse_add(m, s, xr[col]);
        dt_block_lse(m, s, scratch);
        softmax_write_row(xr, y + row * n, n, kept, m, s, threadIdx.x, blockDim.x);
    }
}

template <typename T>
__device__ __forceinline__ void softmax_backward_row(const T* __restrict__ g, const T* __restrict__ y,
                                                     T* __restrict__ grad_x, dt_index n, T dot, dt_index first,
                                                     dt_index stride) {
    for (dt_index col = first; col < n; col += stride) grad_x[col] = (g[col] - dot) * y[col];
}

template <typename T>
__device__ __forceinline__ void softmax_backward_warp_impl(const T* __restrict__ grad_y, const T* __restrict__ y,
                                                           T* __restrict__ grad_x, dt_index n_rows, dt_index n) {
    const int lane = threadIdx.x % DT_WARP;
    DT_FOR_EACH_WARP_ROW(row, n_rows) {
        const dt_index base = row * n;
        T dot = T(0);
        for (dt_index col = lane; col < n; col += DT_WARP) dot += grad_y[base + col] * y[base + col];
        dot = dt_warp_sum(dot);
        softmax_backward_row(grad_y + base, y + base, grad_x + base, n, dot, lane, DT_WARP);
    }
}

template <typename T>
__device__ __forceinline__ void softmax_backward_block_impl(const T* __restrict__ grad_y, const T* __restrict__ y,
                                                            T* __restrict__ grad_x, dt_index n_rows, dt_index n) {
    T* scratch = dt_shared<T>();
    for (dt_index row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const dt_index base = row * n;
        T dot = T(0);
        for (dt_index col = threadIdx.x; col < n; col += blockDim.x) dot += grad_y[base + col] * y[base + col];
        dot = dt_block_sum(dot, scratch);
        softmax_backward_row(grad_y + base, y + base, grad_x + base, n, dot, threadIdx.x, blockDim.x);
    }
}

#define DT_SOFTMAX_KERNELS(T, S)                                                                              \
    extern "C" __global__ void DT_BOUNDS_WIDE softmax_forward_warp_##S(const T* x, T* y, dt_index n_rows,     \
                                                                       dt_index n, dt_index queries,          \
                                                                       int causal) {                          \
        softmax_forward_warp_impl<T>(x, y, n_rows, n, queries, causal);                                       \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS_WIDE softmax_forward_block_##S(const T* x, T* y, dt_index n_rows,    \
                                                                        dt_index n, dt_index queries,         \
                                                                        int causal) {                         \
        softmax_forward_block_impl<T>(x, y, n_rows, n, queries, causal);                                      \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS_WIDE softmax_backward_warp_##S(const T* grad_y, const T* y,          \
                                                                        T* grad_x, dt_index n_rows,           \
                                                                        dt_index n) {                         \
        softmax_backward_warp_impl<T>(grad_y, y, grad_x, n_rows, n);                                          \
    }                                                                                                         \
    extern "C" __global__ void DT_BOUNDS_WIDE softmax_backward_block_##S(const T* grad_y, const T* y,         \
                                                                         T* grad_x, dt_index n_rows,          \
                                                                         dt_index n) {                        \
        softmax_backward_block_impl<T>(grad_y, y, grad_x, n_rows, n);                                         \
    }
DT_FOR_FLOATS(DT_SOFTMAX_KERNELS)
