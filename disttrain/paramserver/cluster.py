"""Cluster: S parameter servers and W workers as processes on this machine (`disttrain ps-cluster`).

    cluster = Cluster(spec, "runs/charlm-ps")      # spec: a JobSpec with [parallel] mode = "ps" and [ps] settings
    cluster.run()                                  # start everything, supervise, stop the servers at the end

What it does, in order:
    1. checks the output directory: one that holds an earlier run is refused unless `resume` (continue it:
       servers from their snapshots, workers from their checkpoints; refused when a snapshot is behind worker
       0's checkpoint, resume_check.py) or `overwrite` (its outputs are deleted; keys are kept);
    2. writes OUT/job.toml (the resolved job: every process reads the same one) and, unless insecure, CURVE
       keys into OUT/keys (one server pair, one pair per worker plus "admin");
    3. starts the servers on 127.0.0.1, each writing its endpoint into OUT/ps/server-I.endpoint and snapshotting
       to OUT/ps-snapshots/server-I.snap (the first snapshot before it listens);
    4. starts the workers; worker 0's stdout goes to the terminal and its stderr to the terminal and its log,
       the others and the servers log into OUT/logs/; worker K > 0 keeps its checkpoint in OUT/workers/worker-K;
    5. supervises: a server that dies is restarted on the same port from its snapshot, and the log says what
       that snapshot holds (the workers reconnect); a worker that fails is reported with the end of its log and
       the others go on (the servers drop it after heartbeat_timeout); what a server marks for the operator
       (alerts.py: a snapshot it cannot write) is shown on the terminal as it comes;
    6. when every worker has exited, stops the servers with SIGTERM (each writes a final snapshot); a server that
       could not write its final snapshot (or had to be killed) makes run() end with an error, never "done".
Children run with this process's interpreter and this disttrain (never a `disttrain` in the working
directory). Each process gets cores / (S + W) BLAS threads unless OMP_NUM_THREADS is set.
Ctrl-C / SIGTERM stops the workers (they checkpoint and leave the servers), then the servers.
"""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import disttrain
from disttrain.paramserver.alerts import ALERT_PREFIX
from disttrain.paramserver.auth import ADMIN_NAME, generate_keys, worker_key_name
from disttrain.paramserver.job import check_shards
from disttrain.paramserver.resume_check import check_snapshots_not_behind
from disttrain.paramserver.snapshot import SnapshotError, read_meta
from disttrain.subprocesses import end_with_parent
from disttrain.train import saving as ckpt
from disttrain.train.loop import CONFIG_FILE, CURVES_FILE, METRICS_FILE

__all__ = ["Cluster", "ADMIN_ID", "ADMIN_KEY", "child_command"]

ADMIN_KEY = ADMIN_NAME
ADMIN_ID = 65535           # the worker id monitoring clients (observers) use
LOG_TAIL = 15              # lines of a failed process's log shown on the console
# what a run writes into its directory besides keys/ (the checkpoint is ckpt.remove_checkpoints' to find)
RUN_OUTPUTS = ("job.toml", "ps", "ps-snapshots", "logs", "workers", METRICS_FILE, CURVES_FILE, CONFIG_FILE)


def child_command(module, argv):
    """argv running `module` with this interpreter and the disttrain this process imported.

    `python -m` would put the working directory first on sys.path, so a `disttrain` folder there (another
    checkout) would be imported instead. -P (Python 3.11+; -I before it) keeps it off; _child_env puts the
    directory this disttrain came from first on PYTHONPATH.
    """
    safe_path = "-P" if sys.version_info >= (3, 11) else "-I"
    return [sys.executable, safe_path, "-m", module, *argv]


def _package_root():
    return str(Path(disttrain.__file__).resolve().parent.parent)


class Cluster:
    def __init__(self, spec, out_dir, insecure=False, port=0, quiet=False, log=None, resume=False, overwrite=False):
        if resume and overwrite:
            raise ValueError("give --resume or --overwrite, not both")
        self.spec, self.out = spec, Path(out_dir)
        self.num_servers, self.num_workers = spec.ps.servers, spec.ps.workers
        check_shards(spec, self.num_workers)
        self.insecure, self.port = insecure, port
        self.resume, self.overwrite = resume, overwrite
        self.quiet = quiet                       # True: worker 0 logs to its file only (tests)
        self.log = log or (lambda text: print(f"[ps-cluster] {text}", file=sys.stderr, flush=True))
        self.servers, self.workers = {}, {}      # index -> Popen
        self._alerts = {}                        # server index -> _AlertFollower of its log
        self.stop_errors = []                    # one line per server that did not stop cleanly
        self.endpoints = {}
        self.restarts = 0
        self._stopping = self._stopped = False
        self._files = []
        self._tees = []
        self._checked = False

    # ------------------------------------------------------------------------------------------ paths
    @property
    def job_file(self):
        return self.out / "job.toml"

    @property
    def keys_dir(self):
        return None if self.insecure else self.out / "keys"

    def snapshot_path(self, index):
        return self.out / "ps-snapshots" / f"server-{index}.snap"

    def log_path(self, name):
        return self.out / "logs" / f"{name}.log"

    def _endpoint_file(self, index):
        return self.out / "ps" / f"server-{index}.endpoint"

    # ------------------------------------------------------------------------------------------ start
    def earlier_run(self):
        """The outputs of an earlier run in the output directory (names), empty when there are none."""
        found = [name for name in RUN_OUTPUTS if (self.out / name).exists()]
        return found + (["checkpoints"] if ckpt.list_checkpoints(self.out) else [])

    def check_run_dir(self):
        """Refuse a directory holding an earlier run unless resume or overwrite; overwrite deletes its outputs.
        Raises ValueError naming the directory and what to do."""
        if self._checked:
            return
        earlier = self.earlier_run()
        if self.resume:
            missing = [str(path) for path in map(self.snapshot_path, range(self.num_servers)) if not path.exists()]
            if not ckpt.list_checkpoints(self.out):
                missing.append(f"a checkpoint in {self.out / 'checkpoints'} (worker 0's)")
            if missing:
                raise ValueError(f"--resume: {self.out} holds no run to continue: missing {', '.join(missing)}; "
                                 f"run without --resume (or with --overwrite) to start one")
            check_snapshots_not_behind(self.out, list(map(self.snapshot_path, range(self.num_servers))))
        elif earlier and not self.overwrite:
            raise ValueError(f"{self.out} holds an earlier run ({', '.join(earlier)}): give --resume to continue "
                             f"it or --overwrite to start over, or choose another --out")
        elif earlier:
            for name in RUN_OUTPUTS:
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            ckpt.remove_checkpoints(self.out)
            self.log(f"--overwrite: removed the earlier run in {self.out} ({', '.join(earlier)})")
        self._checked = True

    def prepare(self):
        self.check_run_dir()
        for sub in ("", "ps", "logs", "ps-snapshots"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.job_file.write_text(self.spec.to_toml(), encoding="utf-8")
        if not self.insecure:
            generate_keys(self.keys_dir, [worker_key_name(k) for k in range(self.num_workers)] + [ADMIN_KEY])

    def _security_args(self, key_name=None):
        if self.insecure:
            return ["--insecure"]
        return ["--keys", str(self.keys_dir)] + (["--key-name", key_name] if key_name else [])

    def _spawn(self, name, argv, to_terminal=False):
        """Start `disttrain <argv>` as a child; its output goes to logs/NAME.log (stderr also to the terminal,
        stdout only there, when to_terminal), so an early failure is in the log and can be shown."""
        log = open(self.log_path(name), "ab")
        self._files.append(log)
        cmd = child_command("disttrain.paramserver.cli", argv)
        proc = subprocess.Popen(cmd, stdout=None if to_terminal else log,
                                stderr=subprocess.PIPE if to_terminal else log, env=self._env(),
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=end_with_parent(os.getpid()))
        if to_terminal:
            tee = threading.Thread(target=_tee, args=(proc.stderr, log), name=f"tee-{name}", daemon=True)
            tee.start()
            self._tees.append(tee)
        return proc

    def _env(self):
        """This disttrain first on PYTHONPATH; BLAS threads: cores / (servers + workers) per process unless
        OMP_NUM_THREADS is set (no oversubscription)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
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
        self._alerts.setdefault(index, _AlertFollower(self.log_path(f"server-{index}")))
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
                    raise RuntimeError(f"server {i} exited with status {proc.returncode} before listening"
                                       f"{self._tail(f'server-{i}')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {i} did not start listening within {timeout:g} s"
                                       f"{self._tail(f'server-{i}')}")
                time.sleep(0.05)
            self.endpoints[i] = path.read_text().strip()
        return [self.endpoints[i] for i in sorted(self.endpoints)]

    def start_worker(self, worker):
        """Start worker `worker`; one beyond the job's workers gets a key of its own (and data shard K mod W)."""
        if not self.insecure and worker >= self.num_workers:
            generate_keys(self.keys_dir, [worker_key_name(worker)])
        argv = ["ps-worker", str(self.job_file), "--id", str(worker), "--shards", str(self.num_workers),
                "--connect", ",".join(self.endpoints[i] for i in range(self.num_servers)), "--out", str(self.out),
                *(["--resume"] if self.resume else []), *self._security_args(worker_key_name(worker))]
        self.workers[worker] = self._spawn(f"worker-{worker}", argv, to_terminal=self._on_terminal(worker))
        return self.workers[worker]

    def _on_terminal(self, worker):
        return worker == 0 and not self.quiet

    def start(self):
        self.prepare()
        for i in range(self.num_servers):
            self.start_server(i)
        endpoints = self.wait_for_servers()
        self.log(f"{self.num_servers} server(s) at {', '.join(endpoints)} ({self.spec.ps.consistency}"
                 f"{', insecure' if self.insecure else ', CURVE'}); {'resuming' if self.resume else 'starting'} "
                 f"{self.num_workers} worker(s); logs in {self.out / 'logs'}")
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

    def restart_source(self, index):
        """What a restart of server `index` restores, in words: its snapshot and the snapshot's age, or the
        initial weights."""
        path = self.snapshot_path(index)
        if not path.exists():
            return f"the initial weights (no snapshot at {path}): every update it applied is lost"
        try:
            meta = read_meta(path)
        except SnapshotError as exc:
            return f"nothing: {exc}"
        written = meta.get("time")
        age = f"written {time.time() - written:.1f} s ago" if isinstance(written, (int, float)) else "of unknown age"
        return (f"{path}, {age}, holding {meta.get('updates')} updates (those it applied after that are lost; "
                f"its log counts them per worker as they rejoin)")

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
                        shown = "" if self._on_terminal(k) else self._tail(f"worker-{k}")
                        self.log(f"worker {k} exited with status {code}; the others go on (log: "
                                 f"{self.log_path(f'worker-{k}')}){shown}")
            self._forward_alerts()
            if all(code is not None for code in codes.values()):
                return codes
            if restart_servers and not self._stopping:
                for i, proc in list(self.servers.items()):
                    if proc.poll() is not None:
                        self.log(f"server {i} exited with status {proc.returncode}; restarting it from "
                                 f"{self.restart_source(i)}{self._tail(f'server-{i}') if proc.returncode > 0 else ''}")
                        self.restart_server(i)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout:g} s")
            time.sleep(poll)

    def _forward_alerts(self):
        """Show on the terminal what the servers marked for the operator since the last look."""
        for follower in self._alerts.values():
            for line in follower.new_alerts():
                self.log(line)

    def _server_stop_errors(self, timeout):
        """After the servers were stopped: one line per server that did not stop cleanly (their other alerts are
        shown)."""
        errors = []
        for i, proc in sorted(self.servers.items()):
            alerts = self._alerts[i].new_alerts() if i in self._alerts else []
            if proc.returncode == 0:
                for line in alerts:
                    self.log(line)
                continue
            for line in alerts[:-1]:
                self.log(line)
            if proc.returncode < 0:
                errors.append(f"server {i} did not stop within {timeout:g} s of SIGTERM and was killed: its final "
                              f"snapshot was not written; {self.restart_source(i)}")
            elif alerts:
                errors.append(alerts[-1])
            else:
                errors.append(f"server {i} exited with status {proc.returncode} while stopping (log: "
                              f"{self.log_path(f'server-{i}')}){self._tail(f'server-{i}')}")
        return errors

    def _tail(self, name):
        """The last lines of logs/NAME.log, indented, for a message (empty when there are none)."""
        try:
            lines = self.log_path(name).read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
        except OSError:
            return ""
        return "".join(f"\n    {line}" for line in lines) if lines else f" ({self.log_path(name)} is empty)"

    def stop(self, timeout=30.0):
        """SIGTERM to the workers still running, then to the servers (final snapshots); SIGKILL stragglers.
        stop_errors then holds one line per server that did not stop cleanly (its final snapshot unwritten)."""
        if self._stopped:
            return
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
        for tee in self._tees:
            tee.join(timeout=10)
        self._tees = []
        for f in self._files:
            _close_log(f)
        self._files = []
        self.stop_errors = self._server_stop_errors(timeout)
        self._stopped = True

    def run(self):
        """start(), supervise(), stop(); returns worker 0's exit status (Ctrl-C: 130), or 1 when it was 0 but a
        server could not write its final snapshot."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.start()
            codes = self.supervise()
        except KeyboardInterrupt:
            self.log("interrupted: stopping workers and servers")
            self._stop_and_report()
            return 130
        except RuntimeError as exc:
            self.log(f"error: {exc}")
            self._stop_and_report()
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)
        clean = self._stop_and_report()
        failed = {k: c for k, c in codes.items() if c}
        if clean:
            self.log(f"done; outputs in {self.out}" + (f"; workers with errors: {failed}" if failed else ""))
        code = codes.get(0, 1)
        code = 128 - code if code < 0 else code        # killed by signal N: 128 + N, as a shell reports it
        return code or (0 if clean else 1)

    def _stop_and_report(self):
        """stop(); each server that did not stop cleanly is one error line. True when there was none."""
        self.stop()
        for line in self.stop_errors:
            self.log(f"error: {line}")
        return not self.stop_errors

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(timeout=10.0)


class _AlertFollower:
    """Reads a server's log as it grows (a restarted server appends to it) and picks out the lines marked with
    ALERT_PREFIX; reading the file, rather than piping the server's output, leaves a server writing to a file
    whatever becomes of this process."""

    def __init__(self, path):
        """Follow `path` from its present end (what an earlier run wrote there was shown then)."""
        self.path, self._partial = path, b""
        try:
            self._offset = path.stat().st_size
        except OSError:
            self._offset = 0

    def new_alerts(self):
        """The marked lines completed since the last call, without the mark."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        marked = [line.decode("utf-8", errors="replace") for line in lines
                  if line.startswith(ALERT_PREFIX.encode())]
        return [line[len(ALERT_PREFIX):] for line in marked]


def _tee(pipe, log):
    """Copy a child's stderr, line by line, to this process's stderr and to the child's log file (while the log
    can be written: a full disk must not silence the terminal)."""
    for line in pipe:
        if log is not None:
            try:
                log.write(line)
                log.flush()
            except OSError:
                log = None
        sys.stderr.write(line.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    pipe.close()


def _close_log(log):
    """Close a child's log file; on a full disk its last buffered bytes are lost, which must not stop the stop."""
    try:
        log.close()
    except OSError:
        pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
