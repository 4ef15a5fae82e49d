// Shared __device__ preamble of every disttrain kernel source (Chainer's LSTM style: the forward and
// backward kernels see the same sigmoid/tanh, so they agree on every activation bit).
//
// NOTE: NVRTC compiles this at run time (loader.py pastes it in place of the #include line), so it
// includes no system header: only CUDA built-ins (expf, tanh, __shfl_xor_sync, atomicAdd, ...).
// NOTE: every kernel is `extern "C"` with a dtype suffix (_f32, _f64): names are not mangled, so
// loader.py asks for them by plain name and the nvcc -ptx test finds them in the PTX.
#ifndef DT_COMMON_CUH
#define DT_COMMON_CUH

// Block sizes the kernels are compiled for (__launch_bounds__); launch.py holds the same numbers and a
// CPU test checks that they agree.
#define DT_BLOCK 256        // elementwise, row-wise elementwise, scatter-add, optimizer, norm kernels
#define DT_MAX_BLOCK 1024   // row-per-block softmax / cross-entropy
#define DT_WARP 32
// __launch_bounds__ of the DT_BLOCK kernels: at least 4 resident blocks per SM (<= 64 registers per
// thread), which also keeps ptxas from spilling the double-precision exp/pow paths on sm_80.
#define DT_BOUNDS __launch_bounds__(DT_BLOCK, 4)
#define DT_BOUNDS_WIDE __launch_bounds__(DT_MAX_BLOCK)

typedef long long dt_index;  // int64, the dtype of every index array and size argument

// ---- math with one spelling for float and double ------------------------------------------------
__device__ __forceinline__ float dt_exp(float x) { return expf(x); }
__device__ __forceinline__ double dt_exp(double x) { return exp(x); }
__device__ __forceinline__ float dt_log(float x) { return logf(x); }
__device__ __forceinline__ double dt_log(double x) { return log(x); }
__device__ __forceinline__ float dt_erfc(float x) { return erfcf(x); }
__device__ __forceinline__ double dt_erfc(double x) { return erfc(x); }
__device__ __forceinline__ float dt_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dt_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float dt_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dt_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dt_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double dt_abs(double x) { return fabs(x); }
__device__ __forceinline__ float dt_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dt_max(double a, double b) { return fmax(a, b); }

template <typename T> __device__ __forceinline__ T dt_neg_inf();
template <> __device__ __forceinline__ float dt_neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double dt_neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

// The logistic function written as kernels_numpy.sigmoid: exp of a non-positive number only, so no
// overflow for large |x| and the same rounding on both sides of zero.
template <typename T> __device__ __forceinline__ T dt_sigmoid(T x) {
    T e = dt_exp(-dt_abs(x));
    return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// Activation codes shared with wrappers.ACTIVATIONS.
#define DT_ACT_IDENTITY 0
#define DT_ACT_RELU 1
#define DT_ACT_TANH 2
#define DT_ACT_SIGMOID 3

template <typename T> __device__ __forceinline__ T dt_activate(T x, int act) {
    switch (act) {
        case DT_ACT_RELU: return x > T(0) ? x : T(0);
        case DT_ACT_TANH: return dt_tanh(x);
        case DT_ACT_SIGMOID: return dt_sigmoid(x);
        default: return x;
    }
}

// d act / d x written with the activation's output y (what forward keeps).
template <typename T> __device__ __forceinline__ T dt_activation_grad(T y, int act) {
    switch (act) {
        case DT_ACT_RELU: return y > T(0) ? T(1) : T(0);
        case DT_ACT_TANH: return T(1) - y * y;
        case DT_ACT_SIGMOID: return y * (T(1) - y);
        default: return T(1);
    }
}

// ---- grid-stride loops ------------------------------------------------------------------------------
// 1-D over n elements; 2-D with rows on blockIdx.y and columns on blockIdx.x (no 64-bit division).
#define DT_FOR_EACH(i, n) \
    for (dt_index i = (dt_index)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (dt_index)blockDim.x * gridDim.x)
#define DT_FOR_EACH_ROW(row, n_rows) for (dt_index row = blockIdx.y; row < (n_rows); row += gridDim.y)
// A warp per row: blockDim.x / 32 rows per block, grid-stride over row groups; all lanes of a warp share `row`.
#define DT_FOR_EACH_WARP_ROW(row, n_rows) \
    for (dt_index row = (dt_index)blockIdx.x * (blockDim.x / DT_WARP) + threadIdx.x / DT_WARP; row < (n_rows); \
         row += (dt_index)gridDim.x * (blockDim.x / DT_WARP))
#define DT_FOR_EACH_COL(col, n_cols) \
    for (dt_index col = (dt_index)blockIdx.x * blockDim.x + threadIdx.x; col < (n_cols); \
         col += (dt_index)blockDim.x * gridDim.x)

// ---- warp and block reductions ------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ T dt_warp_sum(T v) {
    for (int offset = DT_WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename T> __device__ __forceinline__ T dt_warp_max(T v) {
    for (int offset = DT_WARP / 2; offset > 0; offset /= 2) v = dt_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds blockDim.x / 32 values.
// NOTE: contains __syncthreads(): every thread of the block must call it.
template <typename T> __device__ T dt_block_sum(T v, T* scratch) {
    const int lane = threadIdx.x % DT_WARP, warp = threadIdx.x / DT_WARP, warps = blockDim.x / DT_WARP;
    v = dt_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : T(0);
    return dt_warp_sum(v);
}

// Online log-sum-exp: (m, s) stands for log(s) + m, i.e. s = sum exp(x - m) over the values seen.
// Merging two partial results rescales the one with the smaller maximum; an empty part (m = -inf,
// s = 0) contributes nothing, and no exp(-inf - -inf) = NaN is ever formed.
template <typename T> __device__ __forceinline__ void dt_lse_merge(T& m, T& s, T m2, T s2) {
    if (m2 == dt_neg_inf<T>()) return;
    if (m == dt_neg_inf<T>()) { m = m2; s = s2; return; }
    if (m2 > m) {
        s = s * dt_exp(m - m2) + s2;
        m = m2;
    } else {
        s += s2 * dt_exp(m2 - m);
    }
}

template <typename T> __device__ __forceinline__ void dt_lse_add(T& m, T& s, T x) {
    dt_lse_merge(m, s, x, x == dt_neg_inf<T>() ? T(0) : T(1));
}

template <typename T> __device__ __forceinline__ void dt_warp_lse(T& m, T& s) {
    for (int offset = DT_WARP / 2; offset > 0; offset /= 2) {
        T m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        T s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        dt_lse_merge(m, s, m2, s2);
    }
}

// Log-sum-exp over the block; every thread gets (m, s). `scratch` holds 2 * blockDim.x / 32 values.
template <typename T> __device__ void dt_block_lse(T& m, T& s, T* scratch) {
    const int lane = threadIdx.x % DT_WARP, warp = threadIdx.x / DT_WARP, warps = blockDim.x / DT_WARP;
    dt_warp_lse(m, s);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = m;
        scratch[warps + warp] = s;
    }
    __syncthreads();
    m = lane < warps ? scratch[lane] : dt_neg_inf<T>();
    s = lane < warps ? scratch[warps + lane] : T(0);
    dt_warp_lse(m, s);
}

// Dynamic shared memory, typed by the caller (one extern declaration for every instantiation).
extern __shared__ __align__(16) unsigned char dt_shared_bytes[];
template <typename T> __device__ __forceinline__ T* dt_shared() { return reinterpret_cast<T*>(dt_shared_bytes); }

// Both float types for every kernel: DT_FOR_FLOATS(M) expands M(float, f32) M(double, f64).
#define DT_FOR_FLOATS(M) M(float, f32) M(double, f64)

#endif  // DT_COMMON_CUH
