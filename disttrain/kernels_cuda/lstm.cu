// Fused LSTM cell, forward and backward: one thread per (batch row b, hidden unit j) computes all four
// gates of that unit. The recurrent GEMM h @ W_hh^T (forward) and the two GEMMs of backward stay
// on cuBLAS; these kernels fuse everything elementwise around them.
// Layout (PyTorch's): gates (B, 4H) with gate order i, f, g, o; h, c (B, H); all C-contiguous.
// Reference: kernels_numpy.lstm_cell_forward / lstm_cell_backward.
#include "common.cuh"

// pre = gates_x + hh  ->  acts = [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)],
// c_new = f * c + i * g,  tanh_c = tanh(c_new),  h_new = o * tanh_c.
template <typename T>
__device__ __forceinline__ void lstm_cell_forward_impl(const T* __restrict__ gates_x, const T* __restrict__ hh,
                                                       const T* __restrict__ c, T* __restrict__ h_new,
                                                       T* __restrict__ c_new, T* __restrict__ acts,
                                                       T* __restrict__ tanh_c, dt_index batch, dt_index hidden) {
    DT_FOR_EACH_ROW(b, batch) {
        const dt_index gate_row = b * 4 * hidden;
        DT_FOR_EACH_COL(j, hidden) {
            const dt_index k = b * hidden + j, gi = gate_row + j;
            const T i = dt_sigmoid(gates_x[gi] + hh[gi]);
            const T f = dt_sigmoid(gates_x[gi + hidden] + hh[gi + hidden]);
            const T g = dt_tanh(gates_x[gi + 2 * hidden] + hh[gi + 2 * hidden]);
            const T o = dt_sigmoid(gates_x[gi + 3 * hidden] + hh[gi + 3 * hidden]);
            const T cn = f * c[k] + i * g;
            const T tc = dt_tanh(cn);
            acts[gi] = i;
            acts[gi + hidden] = f;
            acts[gi + 2 * hidden] = g;
            acts[gi + 3 * hidden] = o;
            c_new[k] = cn;
            tanh_c[k] = tc;
            h_new[k] = o * tc;
        }
    }
}

// d_pre (B, 4H) and dc_prev (B, H) from the output gradients dh, dc and what forward kept
// (acts, tanh_c) plus the previous cell state c. dh_prev = d_pre @ W_hh and dW_hh = d_pre^T @ h are
// cuBLAS GEMMs in the wrapper.
template <typename T>
__device__ __forceinline__ void lstm_cell_backward_impl(const T* __restrict__ dh, const T* __restrict__ dc,
                                                        const T* __restrict__ acts, const T* __restrict__ tanh_c,
                                                        const T* __restrict__ c, T* __restrict__ d_pre,
                                                        T* __restrict__ dc_prev, dt_index batch, dt_index hidden) {
    DT_FOR_EACH_ROW(b, batch) {
        const dt_index gate_row = b * 4 * hidden;
        DT_FOR_EACH_COL(j, hidden) {
            const dt_index k = b * hidden + j, gi = gate_row + j;
            const T i = acts[gi], f = acts[gi + hidden], g = acts[gi + 2 * hidden], o = acts[gi + 3 * hidden];
            const T tc = tanh_c[k], dhk = dh[k];
            const T dct = dc[k] + dhk * o * (T(1) - tc * tc);
            d_pre[gi] = dct * g * i * (T(1) - i);
            d_pre[gi + hidden] = dct * c[k] * f * (T(1) - f);
            d_pre[gi + 2 * hidden] = dct * i * (T(1) - g * g);
            d_pre[gi + 3 * hidden] = dhk * tc * o * (T(1) - o);
            dc_prev[k] = dct * f;
        }
    }
}

#define DT_LSTM_KERNELS(T, S)                                                                                  \
    extern "C" __global__ void DT_BOUNDS                                                     \
        lstm_cell_forward_##S(const T* gates_x, const T* hh, const T* c, T* h_new, T* c_new, T* acts,          \
                              T* tanh_c, dt_index batch, dt_index hidden) {                                    \
        lstm_cell_forward_impl<T>(gates_x, hh, c, h_new, c_new, acts, tanh_c, batch, hidden);                  \
    }                                                                                                          \
    extern "C" __global__ void DT_BOUNDS                                                     \
        lstm_cell_backward_##S(const T* dh, const T* dc, const T* acts, const T* tanh_c, const T* c, T* d_pre, \
                               T* dc_prev, dt_index batch, dt_index hidden) {                                  \
        lstm_cell_backward_impl<T>(dh, dc, acts, tanh_c, c, d_pre, dc_prev, batch, hidden);                    \
    }
DT_FOR_FLOATS(DT_LSTM_KERNELS)
