"""CUDA-graph capture of a steady-state training step: one launch instead of hundreds.

A PTB step is hundreds of small kernel launches, each paying Python and driver overhead. Captured
once in a CUDA graph (CuPy stream capture), the whole step replays with one graph launch:

    step = CapturedStep(fn, example_inputs, warmup=3)   # runs fn warmup times, then captures it
    loss = step(tokens, targets)                        # copy into the static inputs, launch, sync

    # for LSTMLanguageModel + SGD (the "disttrain cuda-graph" column of benchmarks/bench_train_gpu.py):
    step = capture_lm_step(model, optimizer, batch=20, bptt=20, clip_norm=5.0)
    loss = float(step(tokens, targets)[0])              # the carried (h, c) stays on the device

tests/gpu/test_cuda_graph_gpu.py checks a replayed step against the eager one and
benchmarks/bench_train_gpu.py measures the gain (results in benchmarks/RESULTS.md).

What `fn` must respect (CUDA graphs replay the captured kernels with the captured arguments):
  - no host synchronisation: no .item(), float(tensor), bool(device value) or device-to-host copy.
    The fused kernels never sync; the ops' host-side index checks (cross-entropy classes, embedding
    ids) are switched off while capturing (backend.sync_checks = False), so validate inputs on the
    host instead (capture_lm_step does).
  - the same shapes at every call, and inputs only through the static input buffers.
  - no random numbers (dropout > 0): a replay repeats the draws made at capture.
  - host scalars are frozen at capture: the learning rate (recapture after an LR change, e.g. once
    per epoch) and Adam's step-dependent bias corrections (so capture_lm_step takes SGD only).
Memory: everything allocated while capturing comes from a private CuPy memory pool that nothing else
allocates from, so replays may rewrite those addresses (intermediates, gradients, outputs) safely.
The pool lives as long as the CapturedStep.
"""
import numpy as np

from disttrain.tensor.backend import cuda_backend


class CapturedStep:
    """`fn(*static_inputs)` captured once in a CUDA graph; calling the object replays it.

    example_inputs: arrays (NumPy or CuPy) giving the shapes and dtypes of the inputs; they are
    copied into device buffers that every replay reads. fn returns a tuple of CuPy arrays (or a
    single array): the static outputs, rewritten by each replay.
    """

    def __init__(self, fn, example_inputs, warmup=3):
        import cupy

        self._cupy = cupy
        self.backend = cuda_backend()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()
        self.stream.wait_event(cupy.cuda.get_current_stream().record())  # the caller's work (weights) first
        with self.stream:
            self.static_inputs = tuple(cupy.array(x, copy=True) for x in example_inputs)
            for _ in range(warmup):  # compile kernels, create optimizer state and cuBLAS workspaces
                fn(*self.static_inputs)
            self.stream.synchronize()
            previous = self.backend.sync_checks
            self.backend.sync_checks = False
            try:
                with cupy.cuda.using_allocator(self.pool.malloc):
                    self.stream.begin_capture()
                    try:
                        outputs = fn(*self.static_inputs)
                    finally:
                        self.graph = self.stream.end_capture()
            finally:
                self.backend.sync_checks = previous
        self.static_outputs = outputs if isinstance(outputs, tuple) else (outputs,)

    def __call__(self, *inputs, sync=True):
        """Copy `inputs` into the static buffers, replay the graph; returns the static outputs.

        The replay runs on the graph's own stream, ordered after the work already queued on the
        caller's stream and before the caller's later work. sync=True also waits for it on the host,
        so the outputs can be read.
        """
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"CapturedStep takes {len(self.static_inputs)} inputs, got {len(inputs)}")
        caller = self._cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            for static, x in zip(self.static_inputs, inputs):
                if x.shape != static.shape or x.dtype != static.dtype:
                    raise ValueError(f"CapturedStep: input of shape {x.shape} {x.dtype} does not match the "
                                     f"captured {static.shape} {static.dtype}; capture again for new shapes")
                if isinstance(x, np.ndarray):
                    static.set(x, stream=self.stream)
                else:
                    static[...] = x
            self.graph.launch(stream=self.stream)
        if sync:
            self.stream.synchronize()
        else:
            caller.wait_event(self.stream.record())
        return self.static_outputs

    def synchronize(self):
        self.stream.synchronize()


def capture_lm_step(model, optimizer, batch, bptt, clip_norm=None, warmup=3):
    """A CapturedStep of one TBPTT training step of an LSTMLanguageModel on the GPU with SGD.

    Replays take (tokens, targets), both int64 (bptt, batch) host arrays, and return (loss,) as a
    0-d device array. The LSTM state is carried in device buffers from step to step (zeroed by
    `reset_state()`), as the Trainer carries the detached (h, c).

    The warm-up steps run on dummy tokens and update the weights; afterwards the weights are put
    back in place (the graph holds their addresses) and momentum buffers are zeroed, so the first
    replay is the first step. NOTE: with dampening != 0 a zeroed buffer is not torch's first step
    (buf = g); ptb jobs use no momentum.
    """
    from disttrain.autograd.ops import cross_entropy
    from disttrain.optim import SGD
    from disttrain.tensor.tensor import Tensor

    if not isinstance(optimizer, SGD):
        raise ValueError(f"capture_lm_step supports SGD only: {type(optimizer).__name__}'s per-step host "
                         "scalars (Adam's bias corrections) would be frozen in the graph")
    if getattr(model, "dropout", 0) or getattr(model.lstm, "dropout", 0):
        raise ValueError("capture_lm_step: dropout > 0 would replay the same masks at every step")
    xp = cuda_backend().xp
    layers, hidden = model.lstm.num_layers, model.lstm.hidden_size
    dtype = next(iter(model.parameters())).dtype
    h = xp.zeros((layers, batch, hidden), dtype=dtype)
    c = xp.zeros((layers, batch, hidden), dtype=dtype)
    params = list(model.parameters())
    vocab = model.embedding.weight.shape[0]

    def fn(tokens, targets):
        logits, (h_new, c_new) = model(Tensor(tokens), (Tensor(h), Tensor(c)))
        loss = cross_entropy(logits, Tensor(targets.reshape(-1)))
        optimizer.zero_grad()
        loss.backward()
        if clip_norm is not None:
            grads = [p.grad.data for p in params if p.grad is not None]
            cuda_backend().kernels.clip_by_total_norm_(xp, grads, clip_norm)
        optimizer.step()
        h[...] = h_new.data  # carry the state to the next segment (the graph's next replay)
        c[...] = c_new.data
        return loss.data

    example = np.zeros((bptt, batch), dtype=np.int64)
    initial = [p.data.copy() for p in params]
    step = CapturedStep(fn, (example, example), warmup=warmup)
    for p, value in zip(params, initial):  # undo the warm-up updates in place: the graph holds p.data
        p.data[...] = value
    for state in optimizer.state.values():
        if state.get("momentum_buffer") is not None:
            state["momentum_buffer"].fill(0)
    h.fill(0)
    c.fill(0)

    def run(tokens, targets, sync=True):
        for name, ids in (("tokens", tokens), ("targets", targets)):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):  # the checks the graph does not make
                raise ValueError(f"capture_lm_step: {name} out of range [0, {vocab})")
        return step(tokens, targets, sync=sync)

    run.step, run.state = step, (h, c)
    run.reset_state = lambda: (h.fill(0), c.fill(0))
    return run
