"""The memory meter, and what it proves: sqrt(N) checkpointing needs a fraction of the activation memory.

Figures are bytes of arrays, deterministic for a given program, so they are asserted exactly
or as ratios (no timings here).
"""
import gc

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.checkpointing import MemoryMeter, checkpoint_sequential, memory


def test_counts_arrays_once_and_uncounts_them_when_freed():
    w = dt.randn(100, 10)  # alive before the meter: part of start_bytes
    with MemoryMeter() as m:
        assert memory.hook.active
        start = m.live_bytes
        assert start == m.start_bytes >= 4000
        t = dt.zeros(1000)
        assert m.live_bytes - start == 4000
        v = t.reshape((10, 100)).detach()[2:5]  # views of t cost nothing
        wt = w.T  # nor does a view of an array that existed before
        assert m.live_bytes - start == 4000
        del t
        assert m.live_bytes - start == 4000  # v still holds t's memory
        del v, wt
        assert m.live_bytes == start and m.peak_bytes == start + 4000
        m.reset()
        u = dt.ones(250) + 1.0  # ones (1000 B) freed right after the add made its output (1000 B)
        assert m.live_bytes - start == 1000 and m.peak_bytes - start == 2000
        del u
    assert not memory.hook.active
    assert m.live_bytes == start and m.peak_bytes == start + 2000  # frozen at stop


def test_garbage_alive_at_start_does_not_lower_the_figures():
    """A tensor in an unreachable reference cycle when a scanning meter starts is not held: had the scan counted
    it, the collector freeing it inside the metered code would take its bytes off the step's figure."""
    class Cycle:
        pass

    gc.disable()
    try:
        garbage = Cycle()
        garbage.itself, garbage.tensor = garbage, dt.zeros(5000)
        del garbage
        with MemoryMeter() as m:
            gc.collect()
            t = dt.zeros(1000)
            assert m.live_bytes - m.start_bytes == 4000
            del t
    finally:
        gc.enable()
    assert m.peak_bytes - m.start_bytes == 4000


def test_counts_what_nodes_keep_for_backward():
    x = dt.randn(64, 64, requires_grad=True)
    with MemoryMeter() as m:
        y = x.relu()  # output (16 KiB float32) + the node's mask (4 KiB bool)
        assert m.live_bytes - m.start_bytes == 64 * 64 * 4 + 64 * 64
        y.sum().backward()
        del y  # the graph goes with it; x.grad stays
        assert m.live_bytes - m.start_bytes == 64 * 64 * 4


def test_reset_nesting_and_the_process_wide_meter():
    with MemoryMeter() as outer:
        a = dt.zeros(500)
        with MemoryMeter() as inner:
            b = dt.zeros(250)
            del b
            inner.reset()
            assert inner.peak_bytes == inner.live_bytes == inner.start_bytes
            c = dt.zeros(100)
        assert inner.peak_bytes - inner.start_bytes == 400 and not inner.running
        assert outer.peak_bytes - outer.start_bytes == 2000 + 1000  # a and b
        del a, c
    assert not memory.is_enabled()
    with pytest.raises(RuntimeError, match="enable"):
        memory.peak_bytes()
    meter = memory.enable()
    try:
        assert memory.enable() is meter and memory.is_enabled()
        base = memory.live_bytes()
        d = dt.zeros(1000)
        assert memory.live_bytes() - base == 4000 and memory.peak_bytes() >= base + 4000
        del d
        memory.reset_peak()
        assert memory.peak_bytes() == base
    finally:
        memory.disable()
    assert not memory.is_enabled() and not memory.hook.active
    with pytest.raises(ValueError, match="device"):
        MemoryMeter("tpu")


def mlp_step_peak(depth, segments, batch=256, width=32):
    """Peak bytes above the start of one training step (forward + backward) of an MLP of `depth`
    Linear + ReLU blocks.

    A warm-up step and zero_grad(set_to_none=False) first, so the parameter gradients exist
    before the step and the figure is the activation memory (plus transient gradients).
    """
    dt.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
    x = dt.randn(batch, width)
    (model(x) ** 2).mean().backward()
    model.zero_grad(set_to_none=False)
    with MemoryMeter() as m:
        out = model(x) if segments is None else checkpoint_sequential(model, segments, x)
        loss = (out * out).mean()
        del out
        loss.backward()
        del loss
    assert m.live_bytes == m.start_bytes  # nothing leaked by the step
    return m.peak_bytes - m.start_bytes


def test_sqrt_checkpointing_needs_a_fraction_of_the_activation_memory():
    plain = mlp_step_peak(64, None)
    sqrt = mlp_step_peak(64, "sqrt")
    assert plain >= 64 * 256 * 32 * 5  # every layer's output (4 B) and ReLU mask (1 B) per element
    assert sqrt / plain < 0.35
    assert mlp_step_peak(64, 8) == sqrt  # "sqrt" of 64 is 8 segments
    assert mlp_step_peak(16, "sqrt") / mlp_step_peak(16, None) > sqrt / plain  # the gain grows with depth


def test_recurrent_checkpointing_keeps_backward_memory_small():
    """A 1-layer LSTM over T = 256 steps with a loss on the final state (the output sequence
    is dropped after forward): backward holds sqrt(T) carried states plus one segment."""

    def peaks(segments):
        dt.manual_seed(0)
        lstm = nn.LSTM(16, 16, checkpoint_segments=segments)
        x = dt.randn(256, 4, 16)
        with MemoryMeter() as m:
            h_n = lstm(x)[1][0]
            after_forward = m.live_bytes - m.start_bytes
            h_n.sum().backward()
            del h_n
        return after_forward, m.peak_bytes - m.start_bytes

    kept_plain, peak_plain = peaks(None)
    kept_sqrt, peak_sqrt = peaks("sqrt")
    assert kept_sqrt / kept_plain < 0.1
    # the whole step, the (T, B, H) output sequence included: sqrt's peak is mostly that sequence, held
    # twice while the segments' outputs are joined; the plain fused layer keeps 7 (T, B, H) arrays' worth
    assert peak_sqrt / peak_plain < 0.35


def test_cuda_meter_samples_the_pool_when_the_engine_reports_a_device_array(monkeypatch):
    class Pool:  # stands in for cupy.get_default_memory_pool()
        used = 1000

        def used_bytes(self):
            return self.used

        def total_bytes(self):
            return 4096

    class DeviceArray:
        __cuda_array_interface__ = {}

    pool = Pool()
    monkeypatch.setattr(memory, "_cuda_pool", lambda: pool)
    with MemoryMeter("cuda:0") as m:
        pool.used = 3000
        memory.track(DeviceArray())  # what Tensor._wrap does with a CuPy array
        pool.used = 1500
        assert (m.start_bytes, m.live_bytes, m.peak_bytes, m.reserved_bytes) == (1000, 1500, 3000, 4096)
        m.reset()
        assert m.peak_bytes == m.start_bytes == 1500
    assert m.live_bytes == 1500


@pytest.mark.gpu
@pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")
def test_cuda_figures_come_from_the_memory_pool():
    import cupy

    with MemoryMeter("cuda") as m:
        t = dt.zeros(1 << 20, device="cuda")
        assert m.live_bytes - m.start_bytes >= 4 << 20
        assert m.live_bytes == cupy.get_default_memory_pool().used_bytes()
        del t
    assert m.peak_bytes - m.start_bytes >= 4 << 20
    assert np.isfinite(m.reserved_bytes)
