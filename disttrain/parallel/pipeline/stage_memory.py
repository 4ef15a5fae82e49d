"""What one pipeline stage's training step holds at its peak, from two measured micro-batches and the schedule.

    need = stage_step_bytes(model, partition, k, inputs, targets, loss_fn, schedule="1f1b", micro_batches=4)
    need.peak            # bytes above the stage's parameters and buffers at the step's peak
    need.per_micro_batch # what one micro-batch's forward leaves alive until its backward
    stage_holding(k, need)   # how memory_plan predicts the stage from it (PipelineMode, `disttrain plan`)

A stage does not run a whole model's step: it holds several micro-batches' activations at once (as many as
its schedule has forwarded and not yet backwarded), its gradients from the first backward on, and messages:
- the activation receives of all M micro-batches are posted when the step begins (stages after the first):
  micro-batch m's buffer lives until its backward (it is the stage's input);
- each output's gradient receive is posted when the output is sent (stages before the last) and lives until
  that micro-batch's backward;
- every array sent (each output, each input's gradient) stays alive until the step ends (StageLink.end_step);
- with D > 1 replicas, the gradients are packed into one flat buffer to be averaged after the last backward.
Two micro-batches of stage k run here, each forward then backward, under a MemoryMeter, on the output of
stages 0..k-1 for the first micro-batch (computed without a graph): the first backward makes the gradients,
the second accumulates into them. Their figures replayed over the schedule's actions give the peak; the
per-array messages are emulated by the same arrays held the same way. A stage whose output needs no gradient
(no trainable parameter in it or before it: frozen first layers) runs no backward, and one whose input needs
none sends none back, as in the runtime.
The forwards that reach stage k also check that every cut before it, and stage k's own output, carry one
Tensor (CutError naming the block otherwise: stages exchange one Tensor).
"""
from dataclasses import dataclass

import numpy as np

import disttrain as dt
from disttrain.checkpointing import checkpoint
from disttrain.nn.utils import preserved_buffers
from disttrain.parallel.pipeline.partition import CutError
from disttrain.parallel.pipeline.runtime import split_micro_batches
from disttrain.parallel.pipeline.schedule import stage_actions
from disttrain.tensor.memory import MemoryMeter
from disttrain.tensor.random import fork_rng, get_rng_state
from disttrain.tensor.tensor import Tensor
from disttrain.train.memory_plan import holding_for

__all__ = ["MicroBatchMemory", "StageStepMemory", "measure_micro_batches", "replay", "stage_step_bytes",
           "stage_holding"]


@dataclass(frozen=True)
class MicroBatchMemory:
    """Bytes of one stage's micro-batch, each above the live bytes before the phase."""
    received: int              # its activation receive buffer (0 on the first stage)
    gradient_received: int     # its output's gradient receive buffer (0 on the last stage)
    forward_peak: int
    keep: int                  # left alive by the forward until the backward: graph, output, carried state
    first_backward_peak: int   # the backward that makes the stage's gradients
    first_backward_change: int  # (frees the graph and both receive buffers, adds gradients and what is sent)
    backward_peak: int         # a later backward, accumulating into them
    backward_change: int
    gradients: int             # the stage's parameter gradients


@dataclass(frozen=True)
class StageStepMemory:
    peak: int                  # above the stage's parameters and buffers
    per_micro_batch: int       # a micro-batch's forward keeps this (its receive buffers included) until backward
    in_flight: int             # the most micro-batches forwarded and not yet backwarded


def replay(actions, m, micro_batches, replicas=1):
    """The StageStepMemory of a stage whose micro-batches cost `m` (MicroBatchMemory) under `actions`."""
    live = peak = micro_batches * m.received          # every activation receive is posted at the start
    made_gradients, in_flight, most = False, 0, 0
    for action in actions:
        if action.kind == "F":
            peak = max(peak, live + m.forward_peak)
            live += m.keep + m.gradient_received
            in_flight += 1
        else:
            bump, change = ((m.backward_peak, m.backward_change) if made_gradients
                            else (m.first_backward_peak, m.first_backward_change))
            peak = max(peak, live + bump)
            live += change
            made_gradients = True
            in_flight -= 1
        most = max(most, in_flight)
    if replicas > 1:                                   # the flat buffer the replicas' mean is taken in
        peak = max(peak, live + m.gradients)
    return StageStepMemory(peak, m.received + m.keep + m.gradient_received, most)


def measure_micro_batches(stage, x, targets=None, loss_fn=None, first=False, checkpointing=False, device="cpu",
                          input_gradient=True, output_gradient=True):
    """MicroBatchMemory of two micro-batches of `stage` on the input array `x` (tokens on the first stage, the
    previous stage's output elsewhere). loss_fn(output, targets) -> loss on the last stage; None elsewhere
    (its backward starts from a stand-in gradient of the output's shape). input_gradient: whether the stage's
    input needs its gradient (sent back; not on the first stage); output_gradient: whether the next stage sends
    one back for its output (without one, a stage before the last runs no backward). Leaves the gradients as
    before."""
    params = list(stage.parameters())
    saved = [p.grad for p in params]
    sent, states = [], []            # what StageLink keeps until the step ends; the carried states
    try:
        for p in params:
            p.grad = None
        resident = list(stage.state_dict(keep_vars=True).values())
        with MemoryMeter(device, resident=resident) as meter:
            phases = [_micro_batch(meter, stage, x, targets, loss_fn, first, checkpointing, device, sent, states,
                                   input_gradient and not first, output_gradient) for _ in range(2)]
        gradients = sum(p.grad.data.nbytes for p in params if p.grad is not None)
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    (received, gradient_received, forward_peak, keep, b1, c1), (_, _, _, _, b2, c2) = phases
    return MicroBatchMemory(received, gradient_received, forward_peak, keep, b1, c1, b2, c2, gradients)


def _micro_batch(meter, stage, x, targets, loss_fn, first, checkpointing, device, sent, states, input_gradient,
                 output_gradient):
    """(received, gradient received, forward peak, keep, backward peak, backward change) of one micro-batch."""
    received = 0
    if first:
        inputs = x
    else:
        inputs = dt.Tensor(dt.tensor(x, device=device).data, requires_grad=input_gradient)   # the receive buffer
        received = inputs.data.nbytes
    meter.reset()
    start = meter.live_bytes
    inputs = dt.tensor(inputs, device=device) if first else inputs
    y, new_state = checkpoint(stage, inputs, None) if checkpointing else stage(inputs, None)
    states.append(new_state)
    output = loss_fn(y, targets) if loss_fn is not None else y
    forward_peak, keep = meter.peak_bytes - start, meter.live_bytes - start
    gradient = None
    if loss_fn is None:
        sent.append(_one_tensor_out(y, stage).data)
        if output_gradient:
            gradient = dt.Tensor(y.backend.xp.ones_like(y.data))         # the gradient receive buffer
    gradient_received = 0 if gradient is None else gradient.data.nbytes
    runs_backward = output.requires_grad if loss_fn is not None else output_gradient
    del y
    meter.reset()
    before = meter.live_bytes
    if runs_backward:
        output.backward(gradient)
    del output, gradient
    if input_gradient:
        sent.append(inputs.grad.data)
    del inputs
    return received, gradient_received, forward_peak, keep, meter.peak_bytes - before, meter.live_bytes - before


def stage_step_bytes(model, partition, k, inputs, targets, loss_fn, schedule, micro_batches, batch_axis=1,
                     replicas=1, checkpointing=False, device="cpu"):
    """StageStepMemory of stage k of `model` cut by `partition` (the whole model still holds every stage's
    parameters) for a step of this replica's `inputs`, `targets` (NumPy arrays) in `micro_batches`
    micro-batches under `schedule`; loss_fn(output, targets array) is the model's loss. It leaves no trace: the
    random generators and the model's buffers are as before (and its gradients: measure_micro_batches).
    CutError when a cut before stage k or after it does not carry one Tensor."""
    stages = partition.stages
    x = split_micro_batches(np.asarray(inputs), micro_batches, batch_axis)[0]
    y = split_micro_batches(np.asarray(targets), micro_batches, batch_axis)[0]
    last = k == stages - 1
    # training then draws the numbers it would draw without this, and finds the buffers as they were
    with preserved_buffers(model), fork_rng(get_rng_state()):
        with dt.no_grad():
            for j in range(k):
                stage = partition.build_stage(model, j)
                x, _ = stage(dt.tensor(x, device=device) if j == 0 else x, None)
                x = _one_tensor_out(x, stage)
        x = x.numpy() if k else x
        costs = measure_micro_batches(partition.build_stage(model, k), x, y if last else None,
                                      loss_fn if last else None, first=k == 0, checkpointing=checkpointing,
                                      device=device, input_gradient=k > 0 and partition.input_needs_gradient(model, k),
                                      output_gradient=not last and partition.input_needs_gradient(model, k + 1))
    return replay(stage_actions(schedule, stages, micro_batches, k), costs, micro_batches, replicas)


def _one_tensor_out(y, stage):
    """`y`, the output of `stage` that crosses a cut, if it is one Tensor; else CutError naming the stage's last
    block."""
    if not isinstance(y, Tensor):
        raise CutError(f"block {stage.block_names[-1]!r} returns a {type(y).__name__} and ends a pipeline stage, "
                       "but stages exchange one Tensor; choose split_points after blocks that return one Tensor")
    return y


def stage_holding(k, step):
    """memory_plan's Holding of pipeline stage k, whose step measured `step` (a StageStepMemory)."""
    return holding_for("pipeline", stage_activation_bytes=step.per_micro_batch, in_flight=step.in_flight, stage=k,
                       step_bytes=step.peak)
