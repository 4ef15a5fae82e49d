// Gradient norms and clipping without host round trips.
//   norm_accumulate: acc[slot] (double) += sum |x|^p over x (mode SUM_SQ: p = 2, SUM_POW: any p > 0), or
//                    acc[slot] = max(acc[slot], max |x|) (mode MAX_ABS, through the bit pattern: for values
//                    >= 0 the order of IEEE bits is the numeric order, and a NaN wins, as in NumPy).
//                    Block partials in double, one atomic per block.
//   norm_finalize:   out[k] = acc[k]^(1/p) (sqrt for SUM_SQ, identity for MAX_ABS).
//   scale:           x *= coef (a host scalar: clip_grad_norm_ after the host read the norm).
//   clip_scale:      x *= coef with coef = max_norm / (total[0] + 1e-6), unless coef >= 1: the
//                    coefficient is read on the device, so a captured step clips without syncing.
// Reference: kernels_numpy.norms / scale_ / clip_by_total_norm_.
#include "common.cuh"

#define DT_NORM_SUM_SQ 0
#define DT_NORM_MAX_ABS 1
#define DT_NORM_SUM_POW 2

template <typename T>
__device__ __forceinline__ void norm_accumulate_impl(const T* __restrict__ x, dt_index n, double* __restrict__ acc,
                                                     int mode, double p) {
    __shared__ double scratch[DT_BLOCK / DT_WARP];
    double part = 0.0;
    DT_FOR_EACH(i, n) {
        const double a = dt_abs((double)x[i]);
        if (mode == DT_NORM_SUM_SQ) part += a * a;
        else if (mode == DT_NORM_MAX_ABS) part = (a > part || a != a) ? a : part;
        else part += pow(a, p);
    }
    if (mode == DT_NORM_MAX_ABS) {
        // NaN-propagating warp max through the bits (non-negative doubles order like their bits)
        unsigned long long bits = (unsigned long long)__double_as_longlong(part);
        for (int offset = DT_WARP / 2; offset > 0; offset /= 2) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, bits, offset);
            bits = other > bits ? other : bits;
        }
        if (threadIdx.x % DT_WARP == 0) atomicMax(reinterpret_cast<unsigned long long*>(acc), bits);
    } else {
        part = dt_block_sum(part, scratch);
        if (threadIdx.x == 0) atomicAdd(acc, part);
    }
}

__device__ __forceinline__ double norm_root(double v, int mode, double p) {
    if (mode == DT_NORM_SUM_SQ) return sqrt(v);
    if (mode == DT_NORM_MAX_ABS) return v;
    return pow(v, 1.0 / p);
}

template <typename T>
__device__ __forceinline__ void clip_scale_impl(T* __restrict__ x, dt_index n, const double* __restrict__ total,
                                                double max_norm) {
    const double coef = max_norm / (total[0] + 1e-6);  // kernels_numpy.CLIP_EPSILON
    if (coef >= 1.0) return;  // no clipping needed; a NaN total scales by NaN, as clip_grad_norm_ and torch do
    const T c = (T)coef;
    DT_FOR_EACH(i, n) x[i] = x[i] * c;
}

extern "C" __global__ void DT_BOUNDS
    norm_finalize(const double* acc, double* out, dt_index n, int mode, double p) {
    DT_FOR_EACH(k, n) out[k] = norm_root(acc[k], mode, p);
}

#define DT_NORM_KERNELS(T, S)                                                                              \
    extern "C" __global__ void DT_BOUNDS                                                 \
        norm_accumulate_##S(const T* x, dt_index n, double* acc, int mode, double p) {                     \
        norm_accumulate_impl<T>(x, n, acc, mode, p);                                                       \
    }                                                                                                      \
    extern "C" __global__ void DT_BOUNDS scale_##S(T* x, dt_index n, T coef) {           \
        DT_FOR_EACH(i, n) x[i] = x[i] * coef;                                                              \
    }                                                                                                      \
    extern "C" __global__ void DT_BOUNDS                                                 \
        clip_scale_##S(T* x, dt_index n, const double* total, double max_norm) {                           \
        clip_scale_impl<T>(x, n, total, max_norm);                                                         \
    }
DT_FOR_FLOATS(DT_NORM_KERNELS)
