// Fused log-softmax + cross-entropy over the rows of logits (N, C), numerically stable.
//   forward:  one pass over each row with an online log-sum-exp (running max and rescaled sum):
//             lse[r] = log sum_j exp(x[r, j]),  loss[r] = lse[r] - x[r, t[r]]  (0 where t[r] == ignore_index)
//   backward: one elementwise pass: grad[r, j] = (exp(x[r, j] - lse[r]) - [j == t[r]]) * scale[r]
// Only lse (N values) is kept between the two, never the (N, C) probabilities.
// Two forward shapes, picked by launch.softmax_config: a warp per row for narrow rows (no shared
// memory, no __syncthreads), a block per row for wide ones (a vocabulary of 10k words).
// Reference: kernels_numpy.cross_entropy_forward / cross_entropy_backward.
#include "common.cuh"

// Loss of one row from its (m, s) log-sum-exp; one thread writes it.
template <typename T>
__device__ __forceinline__ void xent_finish_row(const T* __restrict__ x, const dt_index* __restrict__ target,
                                                T* __restrict__ losses, T* __restrict__ lse, dt_index row,
                                                dt_index n_cols, dt_index ignore_index, T m, T s) {
    const T l = m + dt_log(s);
    const dt_index t = target[row];
    lse[row] = l;
    // an out-of-range class cannot happen through the op (it checks), but must not read out of bounds
    losses[row] = (t == ignore_index || t < 0 || t >= n_cols) ? T(0) : l - x[t];
}

// A warp per row (DT_FOR_EACH_WARP_ROW).
template <typename T>
__device__ __forceinline__ void xent_forward_warp_impl(const T* __restrict__ logits,
                                                       const dt_index* __restrict__ target, T* __restrict__ losses,
                                                       T* __restrict__ lse, dt_index n_rows, dt_index n_cols,
                                                       dt_index ignore_index) {
    const int lane = threadIdx.x % DT_WARP;
    DT_FOR_EACH_WARP_ROW(row, n_rows) {
        const T* x = logits + row * n_cols;
        T m = dt_neg_inf<T>(), s = T(0);
        for (dt_index col = lane; col < n_cols; col += DT_WARP) dt_lse_add(m, s, x[col]);
        dt_warp_lse(m, s);
        if (lane == 0) xent_finish_row(x, target, losses, lse, row, n_cols, ignore_index, m, s);
    }
}

// A block per row; dynamic shared memory: 2 * blockDim.x / 32 values of T.
template <typename T>
__device__ __forceinline__ void xent_forward_block_impl(const T* __restrict__ logits,
                                                        const dt_index* __restrict__ target, T* __restrict__ losses,
                                                        T* __restrict__ lse, dt_index n_rows, dt_index n_cols,
                                                        dt_index ignore_index) {
    T* scratch = dt_shared<T>();
    for (dt_index row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = logits + row * n_cols;
        T m = dt_neg_inf<T>(), s = T(0);
        for (dt_index col = threadIdx.x; col < n_cols; col += blockDim.x) dt_lse_add(m, s, x[col]);
        dt_block_lse(m, s, scratch);
        if (threadIdx.x == 0) xent_finish_row(x, target, losses, lse, row, n_cols, ignore_index, m, s);
    }
}

// Rows on blockIdx.y, columns on blockIdx.x (launch.rows_config).
template <typename T>
__device__ __forceinline__ void xent_backward_impl(const T* __restrict__ logits, const dt_index* __restrict__ target,
                                                   const T* __restrict__ lse, const T* __restrict__ scale,
                                                   T* __restrict__ grad, dt_index n_rows, dt_index n_cols) {
    DT_FOR_EACH_ROW(row, n_rows) {
        const T l = lse[row], sc = scale[row];
        const dt_index t = target[row];
        const dt_index base = row * n_cols;
        DT_FOR_EACH_COL(col, n_cols) {
            const T p = dt_exp(logits[base + col] - l);
            grad[base + col] = (col == t ? p - T(1) : p) * sc;
        }
    }
}

#define DT_XENT_KERNELS(T, S)                                                                                  \
    extern "C" __global__ void DT_BOUNDS_WIDE                                                 \
        xent_forward_warp_##S(const T* logits, const dt_index* target, T* losses, T* lse, dt_index n_rows,     \
                              dt_index n_cols, dt_index ignore_index) {                                        \
        xent_forward_warp_impl<T>(logits, target, losses, lse, n_rows, n_cols, ignore_index);                  \
    }                                                                                                          \
    extern "C" __global__ void DT_BOUNDS_WIDE                                                 \
        xent_forward_block_##S(const T* logits, const dt_index* target, T* losses, T* lse, dt_index n_rows,    \
                               dt_index n_cols, dt_index ignore_index) {                                       \
        xent_forward_block_impl<T>(logits, target, losses, lse, n_rows, n_cols, ignore_index);                 \
    }                                                                                                          \
    extern "C" __global__ void DT_BOUNDS                                                     \
        xent_backward_##S(const T* logits, const dt_index* target, const T* lse, const T* scale, T* grad,      \
                          dt_index n_rows, dt_index n_cols) {                                                  \
        xent_backward_impl<T>(logits, target, lse, scale, grad, n_rows, n_cols);                               \
    }
DT_FOR_FLOATS(DT_XENT_KERNELS)
