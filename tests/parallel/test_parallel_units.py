"""Unit tests of disttrain.parallel that need no MPI job: bucket layout, host staging, handles, traces."""
import json

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain import trace
from disttrain.parallel.buckets import bucket_layout
from disttrain.parallel.comm import Communicator, Handle, HostStaging, is_device_array, staged
from disttrain.parallel.data_parallel import _mismatch_message, describe


class FakeDeviceArray:
    """A stand-in for a CuPy array: NumPy memory, CuPy's get/set copies and __cuda_array_interface__."""

    def __init__(self, values):
        self._values = np.array(values)
        self.copies = []

    @property
    def __cuda_array_interface__(self):
        return {"shape": self._values.shape, "typestr": self._values.dtype.str, "data": (0, False), "version": 3}

    shape = property(lambda self: self._values.shape)
    dtype = property(lambda self: self._values.dtype)
    nbytes = property(lambda self: self._values.nbytes)

    def get(self, out=None):
        self.copies.append("to host")
        out[...] = self._values
        return out

    def set(self, host):
        self.copies.append("to device")
        self._values[...] = host


class FakeMpiComm:
    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2


class FakeRequest:
    def __init__(self, polls_until_done):
        self.left = polls_until_done

    def Test(self):
        self.left -= 1
        return self.left <= 0

    def Wait(self):
        self.left = 0


def named(*shapes, dtype=dt.float32):
    return [(f"p{i}", nn.Parameter(dt.zeros(*s, dtype=dtype))) for i, s in enumerate(shapes)]


def test_buckets_reverse_order_and_size_cap():
    params = named((256,), (256,), (512,), (64,))       # 1 KiB, 1 KiB, 2 KiB, 256 B in float32
    assert bucket_layout(params, bucket_mb=2304 / 2**20) == [[3, 2], [1, 0]]   # 2304 B: 256 + 2048 fit
    assert bucket_layout(params, bucket_mb=1.0) == [[3, 2, 1, 0]]
    assert bucket_layout(params, bucket_mb=1e-9) == [[3], [2], [1], [0]]   # oversized: one bucket each


def test_buckets_split_by_dtype():
    params = named((4,), (4,)) + named((4,), dtype=dt.float64)
    assert bucket_layout(params, bucket_mb=25) == [[2], [1, 0]]


def test_host_staging_round_trip_through_numpy():
    staging = HostStaging(allocate=lambda n: np.empty(n, dtype=np.uint8))
    dev = FakeDeviceArray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host, finish = staged(staging, dev)
    assert isinstance(host, np.ndarray) and host.shape == (2, 3) and host.dtype == np.float32
    host *= 2                                      # what an allreduce over 2 equal ranks does
    finish()
    np.testing.assert_array_equal(dev._values, 2 * np.arange(6, dtype=np.float32).reshape(2, 3))
    assert dev.copies == ["to host", "to device"]
    again = staging.stage(FakeDeviceArray(np.zeros(6, dtype=np.float32)))
    assert again.base is host.base                 # the host buffer is reused from the pool


def test_staging_send_and_receive_copy_one_way():
    staging = HostStaging(allocate=lambda n: np.empty(n, dtype=np.uint8))
    send = FakeDeviceArray(np.ones(3))
    _, finish = staged(staging, send, copy_out=False)
    finish()
    recv = FakeDeviceArray(np.ones(3))
    _, finish = staged(staging, recv, copy_in=False)
    finish()
    assert send.copies == ["to host"] and recv.copies == ["to device"]


def test_communicator_stages_device_buffers_unless_cuda_aware():
    dev = FakeDeviceArray(np.ones(4, dtype=np.float32))
    assert is_device_array(dev) and not is_device_array(np.ones(4))
    staging_comm = Communicator(FakeMpiComm(), cuda_aware=False)
    target, finish = staging_comm._prepare(dev)
    assert isinstance(target, np.ndarray)
    finish()
    assert dev.copies == ["to host", "to device"]
    host = np.ones(4)
    assert staging_comm._prepare(host)[0] is host
    with pytest.raises(ValueError, match="C-contiguous"):
        staging_comm._prepare(np.ones((4, 4))[:, 0])


def test_cuda_aware_switch_from_environment(monkeypatch):
    monkeypatch.setenv("DISTTRAIN_CUDA_AWARE_MPI", "1")
    assert Communicator(FakeMpiComm()).cuda_aware
    monkeypatch.setenv("DISTTRAIN_CUDA_AWARE_MPI", "0")
    assert not Communicator(FakeMpiComm()).cuda_aware


def test_handle_copies_back_only_in_wait():
    finished = []
    handle = Handle(FakeRequest(polls_until_done=2), finish=lambda: finished.append(True))
    assert not handle.test() and handle.test() and handle.completed_at is not None
    assert finished == []                          # test() may run on the progress thread: no device copies
    handle.wait()
    handle.wait()
    assert finished == [True]


def test_trace_writes_chrome_trace(tmp_path):
    tracer = trace.Tracer(rank=3)
    with trace.tracing(tracer):
        with trace.span("forward"):
            pass
        trace.record("allreduce bucket 0", tracer.origin, tracer.origin + 0.002, lane="comm", bytes=8)
    with trace.span("not recorded"):
        pass
    doc = json.loads(tracer.write(tmp_path / "t.json").read_text())
    spans = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X"}
    assert set(spans) == {"forward", "allreduce bucket 0"}
    assert spans["allreduce bucket 0"]["pid"] == 3 and spans["allreduce bucket 0"]["tid"] == 1
    assert spans["allreduce bucket 0"]["dur"] == pytest.approx(2000, abs=1)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"compute", "comm"}


def test_mismatch_message_names_the_differences():
    a = describe(named((3, 4), (4,)), bucket_mb=25)
    b = describe(named((3, 5), (4,), (2,)), bucket_mb=25)
    message = _mismatch_message([a, b, a])
    assert "rank 1 vs rank 0" in message and "rank 2" not in message
    assert "'p0' shape (3, 5) (rank 0: (3, 4))" in message and "extra param 'p2'" in message
