"""Parameter server over loopback TCP: push+pull throughput vs raw ZMQ, and updates/s with 1, 2, 4 workers.

1. Throughput, side by side (interleaved rounds, median): a 16 MiB float32 parameter set, one server process.
     raw ZMQ          DEALER sends 16 MiB, a ROUTER process echoes the 16 MiB back (copy=False both ways)
     PS push + pull   push the 16 MiB gradient (the server applies SGD), then pull 16 MiB of parameters
     PS push&pull     the same bytes in one request (push with pull=True: the update comes back in the reply)
     ... with CURVE   push + pull encrypted and authenticated (the default of ps-cluster; not the target)
   Each moves 32 MiB per step; GB/s = bytes moved / seconds; ratio = PS / raw (target >= 0.7).
2. Updates/s at the servers: W worker processes (1, 2, 4) push gradients of a 1 MiB parameter set as fast as
   they can (no model compute; push with pull, async) to S = 1 and 2 servers; the servers count updates.

    python benchmarks/bench_paramserver.py [--mb 16] [--rounds 7] [--seconds 3]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from harness import interleaved, machine

from disttrain import optim
from disttrain.paramserver.auth import ClientSecurity, ServerSecurity, generate_keys
from disttrain.paramserver.server import ParameterServer, ServerConfig
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.worker import PSClient
from disttrain.train.build import Schedules

HERE = Path(__file__).resolve()


def layout_of(n_floats, tensors, servers):
    sizes = [n_floats // tensors] * tensors
    sizes[0] += n_floats - sum(sizes)
    return Layout([ParamSpec(f"p{i}", (n,), "<f4") for i, n in enumerate(sizes)], servers)


def make_sgd(params):
    return optim.SGD(params, lr=1e-6), Schedules()


# --------------------------------------------------------------------------------------------- child roles

def serve_raw(port_file):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    Path(port_file).write_text(str(port))
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)


def serve_ps(port_file, n_floats, tensors, servers, index, keys):
    layout = layout_of(n_floats, tensors, servers)
    initial = [np.zeros(p.size, "<f4") for p in layout.params]
    security = ServerSecurity(keys) if keys else None
    server = ParameterServer(index, layout, initial, make_sgd, ServerConfig(log_every=0), security=security,
                             log=lambda text: None)
    Path(port_file).write_text(server.start())
    server.serve(duration=600)


def run_worker(endpoints, n_floats, tensors, worker, seconds):
    layout = layout_of(n_floats, tensors, len(endpoints))
    targets = [np.zeros(p.size, "<f4") for p in layout.params]
    grads = [np.full(p.size, 1e-3, "<f4") for p in layout.params]
    client = PSClient(endpoints, layout, worker, heartbeat_interval=0.5).connect(targets)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        client.push(grads, pull=True)
    client.leave()
    client.close()


def spawn(*argv):
    tmp = os.path.join(tempfile.mkdtemp(prefix="bench-ps-"), "endpoint")
    proc = subprocess.Popen([sys.executable, str(HERE), "--role", *argv, "--port-file", tmp])
    deadline = time.monotonic() + 60
    while not (os.path.exists(tmp) and Path(tmp).read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"benchmark child {argv[0]} did not start")
        time.sleep(0.02)
    time.sleep(0.05)
    text = Path(tmp).read_text().strip()
    os.unlink(tmp)
    return proc, text


# --------------------------------------------------------------------------------------------- part 1

def throughput(mb, rounds, trips):
    n_floats = mb * (1 << 20) // 4
    nbytes = n_floats * 4
    keys = Path(tempfile.mkdtemp(prefix="bench-ps-keys-"))
    generate_keys(keys, ["worker-0"])
    raw_proc, raw_port = spawn("raw")
    ps_proc, ps_endpoint = spawn("ps", "--floats", str(n_floats))
    curve_proc, curve_endpoint = spawn("ps", "--floats", str(n_floats), "--keys", str(keys))
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.connect(f"tcp://127.0.0.1:{raw_port}")
        payload = np.ones(n_floats, "<f4")
        layout = layout_of(n_floats, 1, 1)
        target, grad = np.zeros(n_floats, "<f4"), np.full(n_floats, 1e-3, "<f4")
        plain = PSClient([ps_endpoint], layout, 0, heartbeat_interval=1.0, context=ctx).connect([target])
        curve = PSClient([curve_endpoint], layout, 0, security=ClientSecurity.from_dir(keys, "worker-0"),
                         heartbeat_interval=1.0, context=ctx).connect([np.zeros(n_floats, "<f4")])

        def raw_trips():
            for _ in range(trips):
                raw.send(payload, copy=False)
                back = raw.recv(copy=False)
                assert len(back) == nbytes
            return 2 * nbytes * trips

        def ps_two(client):
            def run():
                for _ in range(trips):
                    client.push([grad], pull=False)
                    client.pull()
                return 2 * nbytes * trips
            return run

        def ps_one():
            for _ in range(trips):
                plain.push([grad], pull=True)
            return 2 * nbytes * trips

        candidates = {"raw ZMQ (16 MiB there, 16 MiB back)": raw_trips, "PS push + pull (2 requests)": ps_two(plain),
                      "PS push&pull (1 request)": ps_one, "PS push + pull with CURVE": ps_two(curve)}
        rates = interleaved(candidates, rounds=rounds, warmup=1)
        raw.send(b"stop")
        plain.leave(), curve.leave()
        plain.close(), curve.close()
        raw.close()
    finally:
        ctx.term()
        for proc in (raw_proc, ps_proc, curve_proc):
            proc.kill()
            proc.wait()
    base = rates["raw ZMQ (16 MiB there, 16 MiB back)"]
    print(f"\n1. push+pull throughput, {mb} MiB float32 parameter set, one server, loopback TCP "
          f"(median of {rounds} interleaved rounds x {trips} steps)")
    print(f"   {'':38s} {'GB/s':>7s} {'ms/step':>8s} {'vs raw':>7s}")
    for name, rate in rates.items():
        print(f"   {name:38s} {rate / 1e9:7.2f} {2 * nbytes / rate * 1e3:8.1f} {rate / base:6.2f}x")


# --------------------------------------------------------------------------------------------- part 2

def updates_per_second(seconds, mb=1, tensors=8):
    n_floats = mb * (1 << 20) // 4
    print(f"\n2. updates/s at the servers: {mb} MiB float32 in {tensors} tensors, async, workers push with pull "
          f"back-to-back (no model compute), {seconds:g} s window")
    print(f"   {'servers':>7s} {'workers':>7s} {'updates/s':>10s} {'per worker':>10s} {'MB/s moved':>10s}")
    for servers in (1, 2):
        for workers in (1, 2, 4):
            procs = [spawn("ps", "--floats", str(n_floats), "--tensors", str(tensors), "--servers", str(servers),
                           "--index", str(i)) for i in range(servers)]
            endpoints = [ep for _, ep in procs]
            layout = layout_of(n_floats, tensors, servers)
            watcher = PSClient(endpoints, layout, 60000, observer=True).connect()
            kids = [subprocess.Popen([sys.executable, str(HERE), "--role", "worker", "--connect", ",".join(endpoints),
                                      "--floats", str(n_floats), "--tensors", str(tensors), "--id", str(k),
                                      "--seconds", str(seconds + 2)]) for k in range(workers)]
            deadline = time.monotonic() + 60
            while len(watcher.stats(0)["clocks"]) < workers and time.monotonic() < deadline:
                time.sleep(0.01)                  # measure only while every worker is pushing
            before, start = [watcher.stats(i)["updates"] for i in range(servers)], time.monotonic()
            time.sleep(seconds)
            after, elapsed = [watcher.stats(i)["updates"] for i in range(servers)], time.monotonic() - start
            for kid in kids:
                kid.wait(timeout=120)
            watcher.close()
            for proc, _ in procs:
                proc.kill()
                proc.wait()
            # every worker step is one update on each server; report steps/s (= updates/s per server)
            rate = (sum(after) - sum(before)) / servers / elapsed
            print(f"   {servers:7d} {workers:7d} {rate:10.1f} {rate / workers:10.1f} "
                  f"{rate * 2 * n_floats * 4 / 1e6:10.1f}")
    print("   (updates/s: optimizer updates per second on each server = worker steps per second, since every step "
          "updates every server's part; measured over a window in which all workers were pushing)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=("raw", "ps", "worker"))
    parser.add_argument("--port-file")
    parser.add_argument("--floats", type=int)
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--keys")
    parser.add_argument("--connect")
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--trips", type=int, default=4)
    args = parser.parse_args()
    if args.role == "raw":
        return serve_raw(args.port_file)
    if args.role == "ps":
        return serve_ps(args.port_file, args.floats, args.tensors, args.servers, args.index, args.keys)
    if args.role == "worker":
        return run_worker(args.connect.split(","), args.floats, args.tensors, args.id, args.seconds)
    print(f"bench_paramserver: {machine()}; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    throughput(args.mb, args.rounds, args.trips)
    updates_per_second(args.seconds)


if __name__ == "__main__":
    sys.exit(main())
