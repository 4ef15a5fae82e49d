// Fused optimizer updates over flat, C-contiguous buffers: one launch updates a whole parameter (or
// a flat buffer holding many) instead of the five to ten elementwise launches of the array code.
// The arithmetic follows kernels_numpy.sgd_step / adam_step (torch's order of operations); the
// scalars that depend only on the step (bias corrections) are computed once on the host and passed in.
#include "common.cuh"

// SGD with momentum, dampening, Nesterov, L2 weight decay and maximize (torch's semantics):
//   d = +-g (+ weight_decay * p);  b = d at the first step, else momentum * b + (1 - dampening) * d;
//   d = d + momentum * b (nesterov) or b;  p = p + d * (-lr).
// `buf` is not touched when use_momentum == 0.
template <typename T>
__device__ __forceinline__ void sgd_step_impl(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                                              dt_index n, T neg_lr, T momentum, T one_minus_dampening,
                                              T weight_decay, int use_momentum, int nesterov, int maximize,
                                              int first) {
    DT_FOR_EACH(i, n) {
        T d = maximize ? -g[i] : g[i];
        const T pi = p[i];
        if (weight_decay != T(0)) d = d + weight_decay * pi;
        if (use_momentum) {
            const T b = first ? d : buf[i] * momentum + one_minus_dampening * d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[i] = pi + d * neg_lr;
    }
}

// Adam / AdamW with AMSGrad and maximize (torch's semantics), for step t (counted from 1):
//   AdamW: p = p * decay_factor (= 1 - lr * weight_decay);   Adam: d = d + weight_decay * p
//   m = lerp(m, d, 1 - beta1) (torch's two-sided lerp);  v = v * beta2 + (1 - beta2) * d * d
//   vmax = max(vmax, v) and use it for v (amsgrad);  p = p + (m * -step_size) / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t). `vmax` is not touched without amsgrad.
template <typename T>
__device__ __forceinline__ void adam_step_impl(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                               T* __restrict__ v, T* __restrict__ vmax, dt_index n, T lerp_weight,
                                               T beta2, T one_minus_beta2, T weight_decay, T decay_factor,
                                               T neg_step_size, T bc2_sqrt, T eps, int decoupled, int amsgrad,
                                               int maximize) {
    DT_FOR_EACH(i, n) {
        T d = maximize ? -g[i] : g[i];
        T pi = p[i];
        if (weight_decay != T(0)) {
            if (decoupled) pi = pi * decay_factor;
            else d = d + weight_decay * pi;
        }
        const T mi = m[i];
        const T diff = d - mi;
        const T m_new = dt_abs(lerp_weight) < T(0.5) ? mi + diff * lerp_weight : d - diff * (T(1) - lerp_weight);
        m[i] = m_new;
        T v_new = v[i] * beta2 + one_minus_beta2 * d * d;
        v[i] = v_new;
        if (amsgrad) {
            v_new = dt_max(vmax[i], v_new);
            vmax[i] = v_new;
        }
        const T denom = dt_sqrt(v_new) / bc2_sqrt + eps;
        p[i] = pi + (m_new * neg_step_size) / denom;
    }
}

#define DT_OPTIM_KERNELS(T, S)                                                                                 \
    extern "C" __global__ void DT_BOUNDS                                                     \
        sgd_step_##S(T* p, const T* g, T* buf, dt_index n, T neg_lr, T momentum, T one_minus_dampening,        \
                     T weight_decay, int use_momentum, int nesterov, int maximize, int first) {                \
        sgd_step_impl<T>(p, g, buf, n, neg_lr, momentum, one_minus_dampening, weight_decay, use_momentum,      \
                         nesterov, maximize, first);                                                           \
    }                                                                                                          \
    extern "C" __global__ void DT_BOUNDS                                                     \
        adam_step_##S(T* p, const T* g, T* m, T* v, T* vmax, dt_index n, T lerp_weight, T beta2,               \
                      T one_minus_beta2, T weight_decay, T decay_factor, T neg_step_size, T bc2_sqrt, T eps,   \
                      int decoupled, int amsgrad, int maximize) {                                              \
        adam_step_impl<T>(p, g, m, v, vmax, n, lerp_weight, beta2, one_minus_beta2, weight_decay,              \
                          decay_factor, neg_step_size, bc2_sqrt, eps, decoupled, amsgrad, maximize);           \
    }
DT_FOR_FLOATS(DT_OPTIM_KERNELS)
