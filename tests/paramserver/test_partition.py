"""A network partition, for real: servers in one network namespace, workers in another (two "hosts" joined by a
veth pair), CURVE on. The link is cut for 10 s (`ip link set ... down`) and restored. Servers and workers
survive; the servers drop the silent workers after heartbeat_timeout and admit them again when they rejoin;
training resumes and ends; every worker step is applied exactly once on every server.

Needs root and network namespaces (CI runs as root); skipped with the reason where they are not permitted.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from disttrain.paramserver.auth import generate_keys
from disttrain.paramserver.cluster import child_command
from disttrain.paramserver.snapshot import read_meta

CUT_SECONDS = 10.0
STEPS = 300
SERVER_ADDRESS, WORKER_ADDRESS = "10.77.0.1", "10.77.0.2"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def two_hosts():
    """(server namespace, worker namespace, the worker side's interface): a veth pair between two fresh
    namespaces, named after this process so that concurrent runs do not collide; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = os.getpid() % 100_000
    servers, workers, server_if, worker_if = f"dtps-s{tag}", f"dtps-w{tag}", f"dtvs{tag}", f"dtvw{tag}"
    try:
        made = ip("netns", "add", servers, check=False)
        if made.returncode:
            pytest.skip(f"network namespaces not permitted here: {made.stderr.strip()}")
        ip("netns", "add", workers)
        ip("link", "add", server_if, "type", "veth", "peer", "name", worker_if)
        ip("link", "set", server_if, "netns", servers)
        ip("link", "set", worker_if, "netns", workers)
        for ns, interface, address in ((servers, server_if, SERVER_ADDRESS), (workers, worker_if, WORKER_ADDRESS)):
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", ns, "link", "set", interface, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield servers, workers, worker_if
    finally:
        for ns in (servers, workers):
            ip("netns", "del", ns, check=False)
        ip("link", "del", server_if, check=False)


def start(namespace, argv, log_path):
    with open(log_path, "ab") as log:
        return subprocess.Popen(["ip", "netns", "exec", namespace,
                                 *child_command("disttrain.paramserver.cli", argv)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def wait_for(condition, what, timeout=120.0, procs=()):
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"a process exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def train_steps(metrics):
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()
            if line.strip() and json.loads(line)["split"] == "train"]


def test_a_ten_second_partition_costs_time_and_nothing_else(two_hosts, ps_job, tmp_path):
    server_ns, worker_ns, worker_if = two_hosts
    _, job = ps_job("ps.servers=2", "ps.workers=2", "ps.consistency=async", "ps.heartbeat_interval=0.3",
                    "ps.heartbeat_timeout=3.0", "ps.reconnect_timeout=60.0", "ps.snapshot_every=0",
                    "ps.snapshot_every_s=0", "train.epochs=100", f"train.max_steps={STEPS}", "train.log_every=5",
                    "data.batch_size=4", n_chars=3000)
    keys = generate_keys(tmp_path / "keys", ["worker-0", "worker-1"])
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    servers, workers = [], []
    try:
        for i in range(2):
            servers.append(start(server_ns, ["ps-server", str(job), "--index", str(i), "--keys", str(keys),
                                             "--bind", f"tcp://{SERVER_ADDRESS}:0", "--endpoint-file",
                                             str(tmp_path / f"server-{i}.endpoint"), "--snapshot",
                                             str(tmp_path / f"server-{i}.snap")], logs / f"server-{i}.log"))
        for i in range(2):
            wait_for((tmp_path / f"server-{i}.endpoint").exists, f"server {i} to listen", procs=servers)
        endpoints = ",".join((tmp_path / f"server-{i}.endpoint").read_text().strip() for i in range(2))
        assert SERVER_ADDRESS in endpoints
        for k in range(2):
            workers.append(start(worker_ns, ["ps-worker", str(job), "--id", str(k), "--connect", endpoints,
                                             "--keys", str(keys), "--out", str(out)], logs / f"worker-{k}.log"))
        wait_for(lambda: train_steps(out / "metrics.jsonl"), "training to start", procs=servers + workers)
        wait_for(lambda: all(f"worker {k} joined" in (logs / f"server-{i}.log").read_text()
                             for i in range(2) for k in range(2)), "both workers to join", procs=servers + workers)

        ip("-n", worker_ns, "link", "set", worker_if, "down")          # the cable is cut
        cut_at_step = max(train_steps(out / "metrics.jsonl"))
        time.sleep(CUT_SECONDS)
        alive = [p.poll() is None for p in servers + workers]
        ip("-n", worker_ns, "link", "set", worker_if, "up")
        assert all(alive), "a process did not survive the partition"

        for proc in workers:
            assert proc.wait(timeout=180) == 0, (logs / "worker-0.log").read_text()[-3000:]
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in servers + workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    steps = train_steps(out / "metrics.jsonl")
    assert cut_at_step < STEPS and steps[-1] == STEPS                  # training went on after the partition
    for i in range(2):
        assert read_meta(tmp_path / f"server-{i}.snap")["updates"] == 2 * STEPS   # each step once, none lost
        log = (logs / f"server-{i}.log").read_text()
        for k in range(2):
            dropped = log.index(f"dropped worker {k} (silent for more than 3 s)")
            assert re.search(rf"worker {k} joined at clock \d+", log[dropped:]), log     # admitted again
    for k in range(2):
        assert "reconnecting to server" in (logs / f"worker-{k}.log").read_text()
