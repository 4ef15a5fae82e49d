"""Cluster: S parameter servers and W workers as processes on this machine (`disttrain ps-cluster`).

    cluster = Cluster(spec, "runs/charlm-ps")      # spec: a JobSpec with [parallel] mode = "ps" and [ps] settings
    cluster.run()                                  # start everything, supervise, stop the servers at the end

What it does, in order:
    1. writes OUT/job.toml (the resolved job: every process reads the same one) and, unless insecure, CURVE
       keys into OUT/keys (one server pair, one pair per worker plus "admin");
    2. starts the servers (`python -m disttrain.paramserver.cli ps-server`) on 127.0.0.1, each writing its
       endpoint into OUT/ps/server-I.endpoint and snapshotting to OUT/ps-snapshots/server-I.snap;
    3. starts the workers; worker 0 writes to the terminal and OUT (metrics.jsonl, curves.png, checkpoint/),
       the others and the servers log into OUT/logs/;
    4. supervises: a server that dies is restarted on the same port from its snapshot (the workers reconnect);
       a worker that dies is reported and the others go on (the servers drop it after heartbeat_timeout);
    5. when every worker has exited, stops the servers with SIGTERM (each writes a final snapshot).
Each process gets cores / (S + W) BLAS threads unless OMP_NUM_THREADS is set.
Ctrl-C / SIGTERM stops the workers (they leave the servers), then the servers.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from disttrain.paramserver.auth import generate_keys

__all__ = ["Cluster", "ADMIN_ID", "ADMIN_KEY"]

ADMIN_KEY = "admin"
ADMIN_ID = 65535           # the worker id monitoring clients (observers) use


class Cluster:
    def __init__(self, spec, out_dir, insecure=False, port=0, python=None, quiet=False, log=None):
        self.spec, self.out = spec, Path(out_dir)
        self.num_servers, self.num_workers = spec.ps.servers, spec.ps.workers
        self.insecure, self.port = insecure, port
        self.python = python or sys.executable
        self.quiet = quiet                       # True: worker 0 logs to a file too (tests)
        self.log = log or (lambda text: print(f"[ps-cluster] {text}", file=sys.stderr, flush=True))
        self.servers, self.workers = {}, {}      # index -> Popen
        self.endpoints = {}
        self.restarts = 0
        self._stopping = False
        self._files = []

    # ------------------------------------------------------------------------------------------ paths
    @property
    def job_file(self):
        return self.out / "job.toml"

    @property
    def keys_dir(self):
        return None if self.insecure else self.out / "keys"

    def snapshot_path(self, index):
        return self.out / "ps-snapshots" / f"server-{index}.snap"

    def _endpoint_file(self, index):
        return self.out / "ps" / f"server-{index}.endpoint"

    # ------------------------------------------------------------------------------------------ start
    def prepare(self):
        for sub in ("", "ps", "logs", "ps-snapshots"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.job_file.write_text(self.spec.to_toml(), encoding="utf-8")
        if not self.insecure:
            generate_keys(self.keys_dir, [f"worker-{k}" for k in range(self.num_workers)] + [ADMIN_KEY])

    def _security_args(self, key_name=None):
        if self.insecure:
            return ["--insecure"]
        return ["--keys", str(self.keys_dir)] + (["--key-name", key_name] if key_name else [])

    def _spawn(self, name, argv, to_terminal=False):
        log = open(self.out / "logs" / f"{name}.log", "ab")
        self._files.append(log)
        cmd = [self.python, "-m", "disttrain.paramserver.cli", *argv]
        out = None if to_terminal else log
        return subprocess.Popen(cmd, stdout=out, stderr=log if not to_terminal else None, env=self._env(),
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _env(self):
        """BLAS threads: cores / (servers + workers) per process unless OMP_NUM_THREADS is set (no oversubscription)."""
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env:
            threads = str(max(1, (os.cpu_count() or 1) // (self.num_servers + self.num_workers)))
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(name, threads)
        return env

    def start_server(self, index, port=None):
        """Start (or restart) server `index`; port None uses the cluster's choice (base + index, or any)."""
        if port is None:
            port = self.port + index if self.port else 0
        self._endpoint_file(index).unlink(missing_ok=True)
        argv = ["ps-server", str(self.job_file), "--index", str(index), "--servers", str(self.num_servers),
                "--bind", f"tcp://127.0.0.1:{port}", "--endpoint-file", str(self._endpoint_file(index)),
                "--snapshot", str(self.snapshot_path(index)), *self._security_args()]
        self.servers[index] = self._spawn(f"server-{index}", argv)
        return self.servers[index]

    def wait_for_servers(self, timeout=120.0, indices=None):
        indices = range(self.num_servers) if indices is None else indices
        deadline = time.monotonic() + timeout
        for i in indices:
            path = self._endpoint_file(i)
            while not path.exists():
                proc = self.servers[i]
                if proc.poll() is not None:
                    raise RuntimeError(f"server {i} exited with status {proc.returncode} before listening; "
                                       f"see {self.out / 'logs' / f'server-{i}.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {i} did not start listening within {timeout:g} s")
                time.sleep(0.05)
            self.endpoints[i] = path.read_text().strip()
        return [self.endpoints[i] for i in sorted(self.endpoints)]

    def start_worker(self, worker):
        argv = ["ps-worker", str(self.job_file), "--id", str(worker), "--shards", str(self.num_workers),
                "--connect", ",".join(self.endpoints[i] for i in range(self.num_servers)), "--out", str(self.out),
                *self._security_args(f"worker-{worker}" if worker < self.num_workers else ADMIN_KEY)]
        self.workers[worker] = self._spawn(f"worker-{worker}", argv, to_terminal=worker == 0 and not self.quiet)
        return self.workers[worker]

    def start(self):
        self.prepare()
        for i in range(self.num_servers):
            self.start_server(i)
        endpoints = self.wait_for_servers()
        self.log(f"{self.num_servers} server(s) at {', '.join(endpoints)} ({self.spec.ps.consistency}"
                 f"{', insecure' if self.insecure else ', CURVE'}); starting {self.num_workers} worker(s); "
                 f"logs in {self.out / 'logs'}")
        for k in range(self.num_workers):
            self.start_worker(k)

    # ------------------------------------------------------------------------------------------ control
    def kill_worker(self, worker, sig=signal.SIGKILL):
        self.workers[worker].send_signal(sig)

    def kill_server(self, index, sig=signal.SIGKILL):
        self.servers[index].send_signal(sig)
        self.servers[index].wait(timeout=30)

    def restart_server(self, index):
        """Start server `index` again on the port it had; it resumes from its snapshot."""
        port = int(self.endpoints[index].rsplit(":", 1)[1])
        self.restarts += 1
        self.start_server(index, port=port)
        self.wait_for_servers(indices=[index])

    def supervise(self, timeout=None, restart_servers=True, poll=0.2):
        """Until every worker exits: restart dead servers. Returns {worker: exit status}."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reported = set()
        while True:
            codes = {k: p.poll() for k, p in self.workers.items()}
            for k, code in codes.items():
                if code is not None and k not in reported:
                    reported.add(k)
                    if code != 0:
                        self.log(f"worker {k} exited with status {code}; the others go on "
                                 f"(see {self.out / 'logs' / f'worker-{k}.log'})")
            if all(code is not None for code in codes.values()):
                return codes
            if restart_servers and not self._stopping:
                for i, proc in list(self.servers.items()):
                    if proc.poll() is not None:
                        self.log(f"server {i} exited with status {proc.returncode}; restarting it from "
                                 f"{self.snapshot_path(i)}")
                        self.restart_server(i)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout:g} s")
            time.sleep(poll)

    def stop(self, timeout=30.0):
        """SIGTERM to the workers still running, then to the servers (final snapshots); SIGKILL stragglers."""
        self._stopping = True
        for group in (self.workers, self.servers):
            for proc in group.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in group.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in self._files:
            f.close()
        self._files = []

    def run(self):
        """start(), supervise(), stop(); returns worker 0's exit status (Ctrl-C: 130)."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.start()
            codes = self.supervise()
        except KeyboardInterrupt:
            self.log("interrupted: stopping workers and servers")
            self.stop()
            return 130
        except RuntimeError as exc:
            self.log(f"error: {exc}")
            self.stop()
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.stop()
        failed = {k: c for k, c in codes.items() if c}
        self.log(f"done; outputs in {self.out}" + (f"; workers with errors: {failed}" if failed else ""))
        return codes.get(0, 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(timeout=10.0)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)

