"""SGD with momentum, dampening, Nesterov momentum, L2 weight decay and maximize: torch's semantics.

Per parameter, with g its gradient (negated when maximize):
    g <- g + weight_decay * p
    b <- g                                     at the first step (torch: the buffer starts as a copy, undamped)
    b <- momentum * b + (1 - dampening) * g    afterwards
    g <- g + momentum * b   if nesterov,  else  g <- b          (when momentum != 0)
    p <- p - lr * g
"""
from disttrain.optim.optimizer import Optimizer
from disttrain.tensor.backend import by_backend


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

    def state_buffers(self, group):
        return 1 if group["momentum"] else 0

    def _update_group(self, params, grads, states, group):
        # one multi-tensor update per backend (backend.kernels.foreach_sgd_step: one pass over all the
        # parameters with the compiled CPU kernels, one fused CUDA kernel per parameter on the GPU)
        for param in params:
            param.begin_inplace("SGD.step")  # bumps the version: graphs recorded before the step fail at backward
        for backend, positions in by_backend(params):
            buffers = backend.kernels.foreach_sgd_step(
                backend.xp, [params[k].data for k in positions], [grads[k] for k in positions],
                [states[k].get("momentum_buffer") for k in positions], group["lr"], group["momentum"],
                group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"])
            for k, buf in zip(positions, buffers):
                if buf is not None:
                    states[k]["momentum_buffer"] = buf
