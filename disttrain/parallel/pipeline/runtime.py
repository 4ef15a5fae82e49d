"""PipelineRuntime: runs one stage's schedule for a step of M micro-batches (forwards, backwards, messages).

    runtime = PipelineRuntime(stage_module, link, schedule="1f1b", micro_batches=4, batch_axis=1)
    result = runtime.step(inputs, targets, loss_fn, states)   # every stage calls it with the same batch
    result.loss        # last stage: the full-batch mean loss (float); other stages: None
    result.states      # per micro-batch: this stage's carried state after the step, detached

Micro-batches: the batch's columns along `batch_axis` (the B streams of a (T, B) token segment, the rows of
an (N, D) MLP batch) cut into M equal groups; micro-batch m is group m. The first stage feeds its inputs
(tokens) to its blocks, each later stage the activation received from the previous stage; the last stage
computes loss_fn(output, targets of m), a mean over m's elements. Backward runs from

    loss_m * backward_scale / M        (last stage)      or      output_m.backward(received gradient)

so the parameter gradients accumulated over the M micro-batches are those of backward_scale x the mean loss
over the whole batch, exactly what one process computes (backward_scale = T for the "sum_over_time" loss).
The returned loss is the plain mean (sum of loss_m / M) for logging.

Frozen layers: input_gradient=False (no trainable parameter before this stage) makes the stage's input need no
gradient, so none is computed or sent back; output_gradient=False (none in or before it either) makes the next
stage send none, so a stage before the last runs no backward at all. Both sides of a cut are given the same
answer (Partition.input_needs_gradient), so no stage waits for a gradient that will not come.

Carried state (truncated BPTT): `states[m]` is micro-batch m's state of this stage's blocks (a list, one
entry per block; None = zeros), i.e. the state of m's columns; the new states are returned detached and are
passed to the next segment's step, so the state flows across segments per stage while gradients stop at
segment borders, as in the one-process loop.

checkpointing=True runs every stage forward under disttrain.checkpointing.checkpoint (GPipe's
re-materialisation): only the stage input is kept per micro-batch in flight and backward recomputes the
stage. Every forward, backward, send and receive is a trace span (disttrain.trace) with its micro-batch.
"""
from dataclasses import dataclass

import numpy as np

import disttrain as dt
from disttrain import trace
from disttrain.checkpointing import checkpoint
from disttrain.models.protocol import detach_tensors
from disttrain.parallel.pipeline.schedule import stage_actions

__all__ = ["PipelineRuntime", "StepResult", "split_micro_batches"]


@dataclass
class StepResult:
    loss: object          # float on the last stage, None elsewhere
    states: list          # per micro-batch: this stage's per-block states (detached)


def split_micro_batches(array, micro_batches, axis):
    """`array` cut into `micro_batches` equal contiguous pieces along `axis`; a clear error if it does not divide."""
    width = array.shape[axis]
    if width % micro_batches:
        raise ValueError(f"pipeline: the batch of {width} along axis {axis} does not divide into "
                         f"{micro_batches} micro-batches; choose micro_batches dividing the per-replica batch")
    return [np.ascontiguousarray(piece) for piece in np.split(array, micro_batches, axis=axis)]


class PipelineRuntime:
    """Executes `schedule` ("gpipe" or "1f1b") on this rank's `stage` (a pipeline Stage module) over `link`."""

    def __init__(self, stage, link, schedule="1f1b", micro_batches=1, batch_axis=1, checkpointing=False,
                 device="cpu", input_gradient=True, output_gradient=True):
        self.stage, self.link, self.schedule = stage, link, schedule
        self.micro_batches, self.batch_axis = micro_batches, batch_axis
        self.checkpointing, self.device = checkpointing, device
        self.first, self.last = link.prev is None, link.next is None
        self.input_gradient = input_gradient and not self.first
        self.output_gradient = output_gradient and not self.last

    # ------------------------------------------------------------------------------------------ one step
    def step(self, inputs, targets, loss_fn, states=None, backward_scale=1.0):
        """Forward and backward of all micro-batches by the schedule; gradients accumulate into .grad."""
        return self._run(stage_actions(self.schedule, self.link.stages, self.micro_batches, self.link.stage),
                         inputs, targets, loss_fn, states, backward_scale)

    def forward_only(self, inputs, targets, loss_fn, states=None):
        """All micro-batch forwards (no graph, no backward): evaluation through the pipeline."""
        forwards = [a for a in stage_actions("gpipe", self.link.stages, self.micro_batches, self.link.stage)
                    if a.kind == "F"]
        with dt.no_grad():
            return self._run(forwards, inputs, targets, loss_fn, states, backward_scale=None)

    def _run(self, actions, inputs, targets, loss_fn, states, backward_scale):
        M = self.micro_batches
        micro_inputs = split_micro_batches(np.asarray(inputs), M, self.batch_axis)
        micro_targets = split_micro_batches(np.asarray(targets), M, self.batch_axis) if self.last else None
        states = list(states) if states is not None else [None] * M
        keys = [(piece.shape, piece.dtype.str) for piece in micro_inputs]
        step = _StepState(M, backward_scale)
        self.link.begin_step(keys)
        try:
            for action in actions:
                if action.kind == "F":
                    self._forward(action.micro_batch, micro_inputs, micro_targets, keys, loss_fn, states, step)
                else:
                    self._backward(action.micro_batch, step)
        finally:
            self.link.end_step()
        loss = sum(step.losses) / M if self.last else None
        return StepResult(loss, states)

    def _forward(self, m, micro_inputs, micro_targets, keys, loss_fn, states, step):
        x = self._stage_input(m, micro_inputs[m], step)
        with trace.span("forward", micro_batch=m):
            y, new_state = self._call_stage(x, states[m])
            states[m] = detach_tensors(new_state)
            if self.last:
                loss = loss_fn(y, micro_targets[m])
                step.losses.append(loss.item())
                if step.backward_scale is not None:
                    step.outputs[m] = loss * (step.backward_scale / step.micro_batches)
        if not self.last:
            backward = step.backward_scale is not None and self.output_gradient
            self.link.send_activation(m, keys[m], y.data, expect_gradient=backward)
            if backward:
                step.outputs[m] = y

    def _stage_input(self, m, micro_input, step):
        if self.first:
            return dt.tensor(micro_input, device=self.device)
        received = self.link.recv_activation(m)
        gradient = step.backward_scale is not None and self.input_gradient
        x = dt.Tensor(received, requires_grad=gradient)
        if gradient:
            step.inputs[m] = x
        return x

    def _backward(self, m, step):
        output = step.outputs.pop(m, None)
        if output is None or (self.last and not output.requires_grad):    # nothing trainable in or before it
            return
        gradient = None if self.last else dt.Tensor(self.link.recv_gradient(m))
        with trace.span("backward", micro_batch=m):
            output.backward(gradient)
        if self.input_gradient:
            x = step.inputs.pop(m)
            self.link.send_gradient(m, x.grad.data)

    def _call_stage(self, x, state):
        if not self.checkpointing or not dt.is_grad_enabled():
            return self.stage(x, state)
        return checkpoint(self.stage, x, state)      # the per-block states (tuples of tensors) pass through


class _StepState:
    """What one step keeps per micro-batch in flight: stage inputs (for their gradients) and outputs."""

    def __init__(self, micro_batches, backward_scale):
        self.micro_batches, self.backward_scale = micro_batches, backward_scale
        self.inputs, self.outputs, self.losses = {}, {}, []
