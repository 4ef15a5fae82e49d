"""SGD with momentum, dampening, Nesterov momentum, L2 weight decay and maximize: torch's semantics.

Per parameter, with g its gradient (negated when maximize):
    g <- g + weight_decay * p
    b <- g                                     at the first step (torch: the buffer starts as a copy, undamped)
    b <- momentum * b + (1 - dampening) * g    afterwards
    g <- g + momentum * b   if nesterov,  else  g <- b          (when momentum != 0)
    p <- p - lr * g
"""
from disttrain.optim.optimizer import Optimizer


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def _validate(self, group):
        if group["lr"] < 0:
            raise ValueError(f"SGD: invalid learning rate lr={group['lr']!r}, must be >= 0")
        if group["momentum"] < 0:
            raise ValueError(f"SGD: invalid momentum={group['momentum']!r}, must be >= 0")
        if group["weight_decay"] < 0:
            raise ValueError(f"SGD: invalid weight_decay={group['weight_decay']!r}, must be >= 0")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: nesterov=True needs momentum > 0 and dampening == 0, "
                             f"got momentum={group['momentum']!r}, dampening={group['dampening']!r}")

    def _update(self, param, grad, state, group):
        momentum = group["momentum"]
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad + group["weight_decay"] * param.data
        if momentum != 0:
            buf = _momentum_step(state, grad, momentum, group["dampening"])
            grad = grad + momentum * buf if group["nesterov"] else buf
        param.add_(grad, alpha=-group["lr"])


def _momentum_step(state, grad, momentum, dampening):
    """Advance the momentum buffer in place (creating it at the first step) and return it."""
    buf = state.get("momentum_buffer")
    if buf is None:
        # a copy: `grad` may be the parameter's own .grad array, which the caller may change later
        buf = state["momentum_buffer"] = grad.copy()
    else:
        buf *= momentum
        buf += (1 - dampening) * grad
    return buf
