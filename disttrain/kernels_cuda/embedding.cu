// Embedding backward as an atomic scatter-add: target[index[r], :] += values[r, :] for every row r of
// values (R, D), repeated indices accumulating (R = number of looked-up tokens, target (V, D));
// negative indices count from the end, as in NumPy.
// One thread per (r, column); rows on blockIdx.y (launch.rows_config). atomicAdd on double needs
// sm_60 or newer (we build for sm_80 and sm_90). The summation order of repeated indices is that of
// the hardware atomics, so float32 results may differ from NumPy's np.add.at in the last bits.
// Reference: kernels_numpy.index_add_rows.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void index_add_rows_impl(T* __restrict__ target, const dt_index* __restrict__ index,
                                                    const T* __restrict__ values, dt_index n_index, dt_index n_cols,
                                                    dt_index n_target_rows) {
    DT_FOR_EACH_ROW(r, n_index) {
        dt_index dest = index[r];
        if (dest < 0) dest += n_target_rows;  // NumPy's negative indices (x[idx] with idx < 0)
        if (dest < 0 || dest >= n_target_rows) continue;  // checked by the ops; never write out of bounds
        DT_FOR_EACH_COL(col, n_cols) atomicAdd(target + dest * n_cols + col, values[r * n_cols + col]);
    }
}

#define DT_EMBEDDING_KERNELS(T, S)                                                                       \
    extern "C" __global__ void DT_BOUNDS                                               \
        index_add_rows_##S(T* target, const dt_index* index, const T* values, dt_index n_index,          \
                           dt_index n_cols, dt_index n_target_rows) {                                    \
        index_add_rows_impl<T>(target, index, values, n_index, n_cols, n_target_rows);                   \
    }
DT_FOR_FLOATS(DT_EMBEDDING_KERNELS)
