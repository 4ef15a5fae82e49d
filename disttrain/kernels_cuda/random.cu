// Counter-based uniform random numbers for dropout masks: out[i] = uniform(seed, offset + i) in [0, 1),
// the counter-based SplitMix64 of kernels_numpy (sample c of seed s = mix64(mix64(s) + (c + 1) * GOLDEN)),
// then the top 24 (float) or 53 (double) bits times 2^-24 / 2^-53, exact in either type. Every sample
// depends on its counter alone, so any grid gives the same bits as the reference. All arithmetic is
// unsigned 64-bit, wrapping modulo 2^64 as NumPy's uint64 does. out C-contiguous.
// Reference: kernels_numpy.counter_uniform (bit for bit).
#include "common.cuh"

typedef unsigned long long dt_u64;  // uint64: the seed and the counter offset

#define DT_SPLITMIX_GOLDEN 0x9E3779B97F4A7C15ULL

__device__ __forceinline__ dt_u64 dt_splitmix64_mix(dt_u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

template <typename T> __device__ __forceinline__ T dt_unit_interval(dt_u64 bits);
template <> __device__ __forceinline__ float dt_unit_interval<float>(dt_u64 bits) {
    return (float)(bits >> 40) * 0x1p-24f;
}
template <> __device__ __forceinline__ double dt_unit_interval<double>(dt_u64 bits) {
    return (double)(bits >> 11) * 0x1p-53;
}

template <typename T>
__device__ __forceinline__ void counter_uniform_impl(T* __restrict__ out, dt_index n, dt_u64 seed, dt_u64 offset) {
    const dt_u64 key = dt_splitmix64_mix(seed);
    DT_FOR_EACH(i, n) {
        const dt_u64 counter = offset + (dt_u64)i;
        out[i] = dt_unit_interval<T>(dt_splitmix64_mix(key + (counter + 1) * DT_SPLITMIX_GOLDEN));
    }
}

#define DT_RANDOM_KERNELS(T, S)                                                                              \
    extern "C" __global__ void DT_BOUNDS counter_uniform_##S(T* out, dt_index n, dt_u64 seed, dt_u64 offset) { \
        counter_uniform_impl<T>(out, n, seed, offset);                                                       \
    }
DT_FOR_FLOATS(DT_RANDOM_KERNELS)
