"""Reverse-mode automatic differentiation: Function, the backward engine, grad mode, hooks, op observers, gradcheck."""
from disttrain.autograd.engine import backward, grad, queue_callback
from disttrain.autograd.function import Function, OpError
from disttrain.autograd.grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from disttrain.autograd.gradcheck import gradcheck
from disttrain.autograd.observe import OpCall, add_op_observer, observe_ops
