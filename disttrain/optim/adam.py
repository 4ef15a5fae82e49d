"""Adam and AdamW (decoupled weight decay), with AMSGrad and maximize: torch's semantics.

Per parameter, at step t (counted per parameter from 1), with g its gradient (negated when maximize):
    Adam:  g <- g + weight_decay * p                 AdamW:  p <- p * (1 - lr * weight_decay)
    m <- m + (1 - beta1) * (g - m)                   (torch's lerp)
    v <- beta2 * v + (1 - beta2) * g * g
    v_max <- max(v_max, v); use v_max for v          (amsgrad)
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
The operations run in torch's order so that float64 results agree to the last few bits.
"""
from disttrain.optim.optimizer import Optimizer
from disttrain.tensor.backend import by_backend


class Adam(Optimizer):
    decoupled_weight_decay = False  # AdamW: decay the weights directly, not through the gradient

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults)

    def _validate(self, group):
        name = type(self).__name__
        if group["lr"] < 0:
            raise ValueError(f"{name}: invalid learning rate lr={group['lr']!r}, must be >= 0")
        if group["eps"] < 0:
            raise ValueError(f"{name}: invalid eps={group['eps']!r}, must be >= 0")
        if group["weight_decay"] < 0:
            raise ValueError(f"{name}: invalid weight_decay={group['weight_decay']!r}, must be >= 0")
        if len(group["betas"]) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {group['betas']!r}")
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}: invalid betas[{i}]={beta!r}, must be in [0, 1)")

    def state_buffers(self, group):
        return 3 if group["amsgrad"] else 2

    def _update_group(self, params, grads, states, group):
        # one multi-tensor update per backend (backend.kernels.foreach_adam_step: one pass over all the
        # parameters with the compiled CPU kernels, one fused CUDA kernel per parameter on the GPU)
        for param, state in zip(params, states):
            if not state:
                _init_state(state, param, group["amsgrad"])
            state["step"] += 1
            param.begin_inplace(f"{type(self).__name__}.step")  # bumps the version (see optimizer.py)
        beta1, beta2 = group["betas"]
        for backend, positions in by_backend(params):
            picked = [states[k] for k in positions]
            backend.kernels.foreach_adam_step(
                backend.xp, [params[k].data for k in positions], [grads[k] for k in positions],
                [s["exp_avg"] for s in picked], [s["exp_avg_sq"] for s in picked],
                [s["max_exp_avg_sq"] if group["amsgrad"] else None for s in picked], [s["step"] for s in picked],
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], self.decoupled_weight_decay,
                group["maximize"])


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p <- p * (1 - lr * weight_decay) each step."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)


def _init_state(state, param, amsgrad):
    xp = param.backend.xp
    state["step"] = 0
    state["exp_avg"] = xp.zeros_like(param.data)
    state["exp_avg_sq"] = xp.zeros_like(param.data)
    if amsgrad:
        state["max_exp_avg_sq"] = xp.zeros_like(param.data)
