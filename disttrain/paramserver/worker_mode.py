"""ParameterServerMode: the mode interface (disttrain/train/mode.py) on a parameter-server worker.

    mode = ParameterServerMode(client, worker=k, workers=W, overlap=..., grad_weight=...)   # paramserver/job.py
    trainer = Trainer(model, data, optimizer, mode=mode)

A worker runs the ordinary Trainer on its share of every batch (shard k of W, like a data-parallel rank) and
never talks to the other workers: its metrics and carried state are its own, and reductions are the identity.
The gradient exchange is the update: `step` pushes this worker's clipped gradients to the servers (weighted
1/W for `[ps] scale_pushes`, so W pushes make one step of the whole batch) and installs the parameters they
send back; the servers apply the job's optimizer and LR schedules. The Trainer's optimizer stays the local one
it built (its state_dict layout makes worker checkpoints load into a local job), and is never stepped here.

With `overlap` (async, or ssp with staleness >= 1, where the push reads ahead so the bound still holds) the push
of step t travels while step t+1 computes: `step` first installs the answer to the previous push, then sends
this one. `start(epoch)` joins the servers and pulls the parameters; `finish()` awaits the last push and
leaves, and worker 0 then waits for the other workers and pulls the final parameters as an observer, so the
Trainer's final evaluation sees the finished model. Only worker 0 evaluates. Worker K > 0 keeps its job
checkpoints in OUT/workers/worker-K, so a resumed cluster continues every worker's shard where it stopped.
"""
import time
from pathlib import Path

import numpy as np

from disttrain.data.source import Share, WHOLE
from disttrain.paramserver import resume_check
from disttrain.train.saving import CheckpointError
from disttrain.train.memory_plan import holding_for
from disttrain.train.mode import Mode

__all__ = ["ParameterServerMode", "ServersBehind", "worker_run_dir"]


class ServersBehind(CheckpointError):
    """Worker 0 resumed from a checkpoint that a server is behind (one line: which, by how much, what to do)."""


class ParameterServerMode(Mode):
    name = "ps"

    def __init__(self, client, worker, workers, overlap=False, grad_weight=1.0, poll_interval=0.2):
        self.client, self.rank, self.world_size = client, worker, workers
        self.is_main = worker == 0
        self.overlap, self.grad_weight, self.poll_interval = overlap, grad_weight, poll_interval
        self.joined = self.finished = False
        self._pending = None
        self._params = []
        self._host = []                     # flat host arrays the client writes into (views on the CPU)
        self._resumed_from = None           # (checkpoint, run_dir) of a resumed worker, until start() checked it

    def prepare(self, model, optimizer, data=None):
        model, optimizer = super().prepare(model, optimizer, data)
        self._params = list(model.parameters())
        for p in self._params:
            if p.device == "cpu":
                if not p.data.flags.c_contiguous:
                    p.data = np.ascontiguousarray(p.data)
                self._host.append(p.data.reshape(-1))
            else:
                self._host.append(np.empty(p.numel(), dtype=p.dtype))
        return model, optimizer

    def memory_holding(self):
        """No optimizer state: the servers update the parameters."""
        return holding_for("ps")

    def train_share(self):
        """Worker k trains on share k mod W of every batch."""
        return Share(self.rank % self.world_size, self.world_size)

    def eval_share(self):
        """Only worker 0 evaluates (the others' figures would be thrown away)."""
        return WHOLE if self.is_main else None

    # ---- joining, the update, leaving ----------------------------------------------------------------
    def resuming_from(self, checkpoint, run_dir):
        """This worker resumes from `checkpoint` (a saving.Checkpoint in `run_dir`): start() checks, once joined,
        that no server is behind it (resume_check.py). Worker 0 refuses to go on from a server behind its
        checkpoint (ServersBehind); a worker K > 0 says so and goes on (its pushes since are lost, as those a
        crashed server loses)."""
        self._resumed_from = (checkpoint, Path(run_dir))

    def start(self, epoch):
        """Join the servers at `epoch` and install the parameters they hold."""
        self.client.connect(self._host, epoch=epoch)
        self.joined = True
        if self._resumed_from is not None:
            self._check_servers_not_behind(*self._resumed_from)
        self.client.pull()
        self._installed()

    def step(self, optimizer, epoch=0):
        """Push this step's gradients, install the parameters the servers answer with."""
        if self.finished:
            raise RuntimeError("ParameterServerMode.step() after the worker finished its steps")
        grads = [self._flat_grad(p) for p in self._params]
        if self.overlap:
            if self._pending is not None:
                self.client.wait(self._pending)
                self._installed()
            self._pending = self.client.push_async(grads, pull=True, epoch=epoch, ahead=True)
        else:
            self.client.push(grads, pull=True, epoch=epoch)
            self._installed()

    def learning_rate(self, optimizer):
        """The servers' lr (they own the schedules), once they have said it."""
        return self.client.lr if self.client.lr is not None else super().learning_rate(optimizer)

    def finish(self):
        """Await the last push and leave; worker 0 waits for the other workers and pulls the final parameters."""
        if self.finished:
            return
        if self._pending is not None:
            self.client.wait(self._pending)
            self._pending = None
            self._installed()
        self.client.leave()                 # first: nobody may wait (ssp, sync) for a worker that pushes no more
        if self.is_main:
            self.client.become_observer()   # an observer's connection may ask for stats
            self._wait_for_others()
            self.client.pull()
            self._installed()
        self.finished = True

    def close(self):
        """Leave (if still joined: a run that stopped early) and close the connections."""
        if self.joined and not self.finished:
            try:
                self.client.leave()
            except Exception:     # leaving is a courtesy: the heartbeat time-out drops us anyway
                pass
        self.client.close()

    def _installed(self):
        """After the client wrote new values into the host arrays: copy them to the device, count the change."""
        for p, host in zip(self._params, self._host):
            if p.device != "cpu":
                p.data[...] = p.backend.asarray(host.reshape(p.shape))
            p.increment_version()

    def _flat_grad(self, p):
        """p's gradient as a flat host array, or None when it has none (frozen, or unused this step): the push
        then says so and the servers leave p alone, as a local optimizer skips it."""
        if p.grad is None:
            return None
        g = np.ascontiguousarray(p.grad.backend.to_numpy(p.grad.data)).reshape(-1)
        if self.grad_weight != 1.0:
            g = g * g.dtype.type(self.grad_weight)      # a new array: never scale the Trainer's own gradient
        return g

    def _check_servers_not_behind(self, checkpoint, run_dir):
        """What each server said at the join (before this worker pushed anything) against its checkpoint."""
        holdings = [(f"server {link.index} at {link.endpoint}",
                     {"updates": link.updates, "clock": link.clock, "last_push": link.last_push})
                    for link in self.client.links]
        behind = resume_check.gaps(holdings, checkpoint.meta, worker=self.rank)
        if not behind:
            return
        if self.is_main:
            raise ServersBehind(resume_check.refusal(
                run_dir, checkpoint, holdings, behind, "the servers are",
                remedy="restart the server from a snapshot that is not behind (its newest), or "))
        self.client.log(f"worker {self.rank}: {'; '.join(behind)} (checkpoint {checkpoint.path}, step "
                        f"{checkpoint.meta['step']}): this worker's pushes since are lost; going on")

    def _wait_for_others(self):
        me = str(self.client.worker_id)
        while True:
            live = set()
            for s in range(len(self.client.links)):
                live |= set(self.client.stats(s)["clocks"])
            if live <= {me}:
                return
            time.sleep(self.poll_interval)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def checkpoint_record(self):
        """What each server had reached when this checkpoint was taken, as it told this worker: this worker's
        clock, the clock of its latest push the server had applied, and the server's update count. A server (or
        its snapshot) holding less is behind the checkpoint (paramserver/resume_check.py)."""
        return {"ps_servers": [{"clock": link.clock, "updates": link.updates, "last_push": link.last_push}
                               for link in self.client.links]}

    def checkpoint_dir(self, out_dir):
        return worker_run_dir(out_dir, self.rank) if out_dir is not None else None

    def describe(self, batch_size, unit="streams"):
        return [f"parameter-server worker {self.rank} of {self.world_size}: share {self.rank % self.world_size} "
                f"of every batch of {batch_size} {unit}, {len(self.client.links)} server(s)"]


def worker_run_dir(out_dir, worker):
    """Where worker `worker` keeps its job checkpoints: the run directory itself for worker 0 (beside its metrics
    and curves), OUT/workers/worker-K for the others."""
    return Path(out_dir) if worker == 0 else Path(out_dir) / "workers" / f"worker-{worker}"
