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

    def _update(self, param, grad, state, group):
        xp = param.backend.xp
        if not state:
            _init_state(state, param, group["amsgrad"])
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grad = -grad
        state["step"] += 1
        if weight_decay != 0:
            if self.decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad + weight_decay * param.data
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        _lerp_(exp_avg, grad, 1 - beta1)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        second_moment = exp_avg_sq
        if group["amsgrad"]:
            second_moment = state["max_exp_avg_sq"]
            xp.maximum(second_moment, exp_avg_sq, out=second_moment)
        direction = _step_direction(xp, exp_avg, second_moment, state["step"], lr, beta1, beta2, group["eps"])
        param.add_(direction)


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


def _step_direction(xp, exp_avg, second_moment, step, lr, beta1, beta2, eps):
    """-lr * m_hat / (sqrt(v_hat) + eps), with torch's bias correction folded into two scalars."""
    step_size = lr / (1 - beta1 ** step)
    denom = xp.sqrt(second_moment)
    denom /= (1 - beta2 ** step) ** 0.5
    denom += eps
    direction = exp_avg * -step_size  # torch's addcdiv: (value * m) / denom
    direction /= denom
    return direction


def _lerp_(target, end, weight):
    """target <- lerp(target, end, weight) in place, with torch's two-sided formula (exact at 0 and 1)."""
    diff = end - target
    if abs(weight) < 0.5:
        diff *= weight
        target += diff
    else:
        diff *= 1 - weight
        target[...] = end - diff
