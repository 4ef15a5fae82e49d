// Gradient-bucket pack / unpack for allreduce: copy a tensor into (or out of) its slice of one flat
// buffer, multiplying by `scale` on the way (1 to pack; 1 / world_size to unpack an averaged sum), so
// the averaging costs no launch of its own. One launch per tensor; src and dst C-contiguous.
// Reference: kernels_numpy.bucket_pack / bucket_unpack.
#include "common.cuh"

#define DT_BUCKET_KERNELS(T, S)                                                                            \
    extern "C" __global__ void DT_BOUNDS                                                 \
        copy_scaled_##S(const T* __restrict__ src, T* __restrict__ dst, dt_index n, T scale, int scaled) { \
        DT_FOR_EACH(i, n) dst[i] = scaled ? src[i] * scale : src[i];                                       \
    }
DT_FOR_FLOATS(DT_BUCKET_KERNELS)
