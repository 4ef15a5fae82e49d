"""The parameter-server mode of the one training loop: servers built from a job, and workers that run Trainer.

A worker is the ordinary Trainer with two pieces swapped in:
    strategy    PSStrategy: the worker's share of the streams (shard_streams, like a data-parallel rank);
                gradients are not synchronised (nothing to average locally), metrics stay the worker's own;
                worker 0 is the main process (progress bar, metrics.jsonl, curves, checkpoints).
    optimizer   RemoteOptimizer: step() pushes the clipped gradients to the servers and installs the
                parameters they send back. The Trainer's step is unchanged: forward, backward, clip, step.
So `[parallel] mode = "ps"` trains exactly what local mode trains; with consistency = "sync" and one worker,
bit for bit the same parameters (tests/paramserver/test_sync_equals_local.py).

Servers build the model from the job (same seed, so the same initial weights as a local run) and the job's
optimizer and LR schedules over their parts (`server_from_spec`).

NOTE (seam): the Trainer is not modified. `run_worker` builds it with the PSStrategy, then puts the
RemoteOptimizer in `trainer.optimizer` (the Trainer only calls zero_grad, step, param_groups, state_dict and
load_state_dict on it); PSTrainer overrides `evaluate` so that only worker 0 spends time evaluating, and
`save_checkpoint` so that every worker keeps a job checkpoint (worker 0 in the run directory, worker K in
OUT/workers/worker-K): a cluster resumed with `--resume` continues each worker's shard where it stopped.
"""
import math
import time
from pathlib import Path

import numpy as np

import disttrain as dt
from disttrain.data import shard_streams
from disttrain.paramserver.consistency import Consistency
from disttrain.paramserver.server import ParameterServer, ServerConfig
from disttrain.paramserver.sharding import Layout
from disttrain.paramserver.worker import PSClient
from disttrain.train import checkpoint as ckpt
from disttrain.train.build import build_corpus, build_model, build_optimizer, build_schedules
from disttrain.train.loop import EvalResult, Trainer
from disttrain.train.strategy import LocalStrategy

__all__ = ["PSStrategy", "RemoteOptimizer", "PSTrainer", "initial_model", "server_from_spec", "layout_from_spec",
           "push_weight", "run_worker", "worker_run_dir"]


class PSStrategy(LocalStrategy):
    """The Trainer's strategy on parameter-server worker `worker` of `num_shards` data shards.

    Workers never talk to each other: everything but the data shard is LocalStrategy's identity (no gradient
    synchronisation — each worker pushes its own gradients in RemoteOptimizer.step, after clipping; metrics and
    checkpointed state are the worker's own). Worker 0 is the main process.
    """

    name = "ps"

    def __init__(self, worker, num_shards):
        self.rank, self.world_size = worker, num_shards
        self.is_main = worker == 0

    def shard(self, streams):
        """Worker k trains on shard k mod num_shards of the (N, B) stream columns."""
        return shard_streams(streams, self.rank % self.world_size, self.world_size)


class RemoteOptimizer:
    """Takes the Trainer's optimizer's place on a worker: step() = push the gradients, install the new parameters.

    local: the optimizer the Trainer built (kept for its param_groups and state_dict layout, so worker
    checkpoints load into a local job). overlap: push step t while step t+1 computes (async, or ssp with
    staleness >= 1, where the push reads ahead so the bound still holds): step() first installs the answer to
    the previous push, then sends this one. grad_weight: what each gradient is multiplied by before it is
    pushed (1/workers for `[ps] scale_pushes`: W pushes of W workers' shares make one step of the whole
    batch). total_steps: after that many steps the last push is awaited and the worker leaves; worker 0 then
    waits for the others to finish and reads the final parameters as an observer, so the Trainer's final
    evaluation sees the finished model.
    """

    def __init__(self, client, params, local, epoch_of=lambda: 0, overlap=False, grad_weight=1.0, total_steps=None,
                 is_main=False, poll_interval=0.2):
        self.client, self.params, self.local = client, list(params), local
        # its own groups: the Trainer's local LR schedules step `local`, never the lr reported here
        self.param_groups = [{"lr": local.param_groups[0]["lr"], "params": self.params}]
        self.state = {}
        self.epoch_of, self.overlap, self.total_steps, self.is_main = epoch_of, overlap, total_steps, is_main
        self.grad_weight = grad_weight
        self.poll_interval = poll_interval
        self.steps = 0
        self.finished = False
        self._pending = None
        self._host = []                     # flat host arrays the client writes into (views on the CPU)
        for p in self.params:
            if p.device == "cpu":
                if not p.data.flags.c_contiguous:
                    p.data = np.ascontiguousarray(p.data)
                self._host.append(p.data.reshape(-1))
            else:
                self._host.append(np.empty(p.numel(), dtype=p.dtype))

    @property
    def targets(self):
        return self._host

    def installed(self):
        """Call after the client wrote new values into `targets`: copy to the device, bump versions, set lr."""
        for p, host in zip(self.params, self._host):
            if p.device != "cpu":
                p.data[...] = p.backend.asarray(host.reshape(p.shape))
            p._version += 1
        if self.client.lr is not None:
            for group in self.param_groups:
                group["lr"] = self.client.lr

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self, closure=None):
        if self.finished:
            raise RuntimeError("RemoteOptimizer.step() after the worker finished its steps")
        grads = [self._flat_grad(p) for p in self.params]
        epoch = self.epoch_of()
        if self.overlap:
            if self._pending is not None:
                self.client.wait(self._pending)
                self.installed()
            self._pending = self.client.push_async(grads, pull=True, epoch=epoch, ahead=True)
        else:
            self.client.push(grads, pull=True, epoch=epoch)
            self.installed()
        self.steps += 1
        if self.total_steps is not None and self.steps >= self.total_steps:
            self.finish()

    def _flat_grad(self, p):
        if p.grad is None:
            return np.zeros(p.numel(), dtype=p.dtype)
        g = np.ascontiguousarray(p.grad.backend.to_numpy(p.grad.data)).reshape(-1)
        if self.grad_weight != 1.0:
            g = g * g.dtype.type(self.grad_weight)      # a new array: never scale the Trainer's own gradient
        return g

    def finish(self):
        """Await the last push; worker 0 waits for the other workers and pulls the final parameters; leave."""
        if self.finished:
            return
        if self._pending is not None:
            self.client.wait(self._pending)
            self._pending = None
            self.installed()
        self.client.leave()                 # first: nobody may wait (ssp, sync) for a worker that pushes no more
        if self.is_main:
            self.client.become_observer()   # an observer's connection may ask for stats
            self._wait_for_others()
            self.client.pull()
            self.installed()
        self.finished = True

    def _wait_for_others(self):
        me = str(self.client.worker_id)
        while True:
            live = set()
            for s in range(len(self.client.links)):
                live |= set(self.client.stats(s)["clocks"])
            if live <= {me}:
                return
            time.sleep(self.poll_interval)

    def state_dict(self):
        """The local optimizer's (empty) state with the servers' lr: loads into a local job's optimizer."""
        state = self.local.state_dict()
        for group in state["param_groups"]:
            group["lr"] = self.param_groups[0]["lr"]
        return state

    def load_state_dict(self, state_dict):
        self.local.load_state_dict(state_dict)


class PSTrainer(Trainer):
    """Trainer for a parameter-server worker: only worker 0 evaluates (the others' results would be thrown away);
    the others write their job checkpoints into `checkpoint_dir` (None: none)."""

    def __init__(self, spec, checkpoint_dir=None, **kwargs):
        super().__init__(spec, **kwargs)
        self.checkpoint_dir = checkpoint_dir

    def evaluate(self, split):
        if not self.strategy.is_main:
            return EvalResult(split, math.nan, 0, self.step)
        return super().evaluate(split)

    def save_checkpoint(self):
        if self.strategy.is_main or self.checkpoint_dir is None:
            return super().save_checkpoint()
        model, arrays, meta = self.checkpoint_state()
        meta["evals"] = {}                    # this worker does not evaluate (its placeholders are NaN)
        return ckpt.save_checkpoint(self.checkpoint_dir, model, arrays, meta, keep=self.spec.train.keep_checkpoints)


def worker_run_dir(out_dir, worker):
    """Where worker `worker` keeps its job checkpoint: the run directory itself for worker 0 (beside its metrics
    and curves), OUT/workers/worker-K for the others."""
    return Path(out_dir) if worker == 0 else Path(out_dir) / "workers" / f"worker-{worker}"


# ------------------------------------------------------------------------------------------------ from a job

def initial_model(spec):
    """The model a local run of the job starts from (same seed, same weights)."""
    dt.manual_seed(spec.train.seed)
    corpus = build_corpus(spec)
    return build_model(spec, len(corpus.vocab))


def layout_from_spec(spec, num_servers=None):
    """The job's Layout (builds the model once; cheap next to training)."""
    model = initial_model(spec)
    return Layout.from_named_arrays(model.named_parameters(), num_servers or spec.ps.servers)


def server_from_spec(spec, index, num_servers=None, bind="tcp://127.0.0.1:0", security=None, snapshot_path=None,
                     log=None):
    """Server `index` for the job: the model's initial weights (the job's seed), the job's optimizer and LR
    schedules over its parts, and the [ps] settings."""
    model = initial_model(spec)
    named = list(model.named_parameters())
    layout = Layout.from_named_arrays(named, num_servers or spec.ps.servers)

    def make_optimizer(params):
        optimizer = build_optimizer(spec, params)
        return optimizer, build_schedules(spec, optimizer)

    ps = spec.ps
    config = ServerConfig(consistency=ps.consistency, staleness=ps.staleness, heartbeat_timeout=ps.heartbeat_timeout,
                          snapshot_every=ps.snapshot_every, snapshot_every_s=ps.snapshot_every_s,
                          snapshot_path=snapshot_path, reject_nonfinite=ps.reject_nonfinite, log_every=ps.log_every,
                          expect_workers=ps.workers, start_timeout=ps.reconnect_timeout, max_epoch=spec.train.epochs)
    return ParameterServer(index, layout, [p.numpy() for _, p in named], make_optimizer, config, bind=bind,
                           security=security, log=log)


def _resume(trainer, worker, own_dir, log):
    if own_dir is None:
        raise ckpt.CheckpointError(f"worker {worker}: resuming needs its run directory (--out)")
    if worker and not ckpt.list_checkpoints(own_dir):
        log(f"worker {worker}: no checkpoint in {own_dir}: its shard starts again from step 0")
        return
    checkpoint = ckpt.load_checkpoint(own_dir)
    trainer.restore(checkpoint)
    log(f"worker {worker}: resuming from {checkpoint.path} at step {trainer.step} (epoch {trainer.epoch + 1})")


def push_weight(ps, num_shards):
    """What a worker's gradient is multiplied by before it is pushed: 1/num_shards for async and ssp with
    `[ps] scale_pushes` (each push is one shard's part of a step of the whole batch), else 1 (sync averages the
    workers' gradients on the servers)."""
    return 1.0 / num_shards if ps.scale_pushes and ps.consistency != "sync" else 1.0


def run_worker(spec, worker, endpoints, num_shards=None, security=None, out_dir=None, progress=None, log=None,
               on_trainer=None, resume=False):
    """Train as worker `worker` against the servers at `endpoints`; returns the Trainer's evals (worker 0's count).

    num_shards: how many data shards the streams are cut into (default [ps] workers). on_trainer(trainer) is
    called once the Trainer exists (the CLI uses it to route SIGTERM to trainer.request_stop). out_dir: the run
    directory (None: no outputs, no checkpoints). resume: continue from this worker's checkpoint in
    worker_run_dir(out_dir, worker) (CheckpointError when worker 0 has none; another worker without one starts
    its shard from step 0, and says so).
    """
    num_shards = num_shards or spec.ps.workers
    is_main = worker == 0
    log = log or (lambda text: None)
    own_dir = worker_run_dir(out_dir, worker) if out_dir is not None else None
    trainer = PSTrainer(spec, out_dir=out_dir if is_main else None, strategy=PSStrategy(worker, num_shards),
                        progress=progress, checkpoint_dir=None if is_main else own_dir)
    if worker:                                    # dropout masks differ between workers; weights come from servers
        dt.manual_seed(spec.train.seed + worker)
    if resume:
        _resume(trainer, worker, own_dir, log)
    layout = Layout.from_named_arrays(trainer.model.named_parameters(), len(endpoints))
    ps = spec.ps
    client = PSClient(endpoints, layout, worker, security=security, heartbeat_interval=ps.heartbeat_interval,
                      server_timeout=ps.heartbeat_timeout, reconnect_timeout=ps.reconnect_timeout, log=log)
    total = trainer.spec.train.epochs * len(trainer.train_iter)
    if trainer.spec.train.max_steps is not None:
        total = min(total, trainer.spec.train.max_steps)
    remote = RemoteOptimizer(client, trainer.params, trainer.optimizer, epoch_of=lambda: trainer.epoch,
                             overlap=ps.overlap and Consistency(ps.consistency, ps.staleness).allows_ahead,
                             grad_weight=push_weight(ps, num_shards), total_steps=total - trainer.step,
                             is_main=is_main)
    client.connect(remote.targets, epoch=trainer.epoch)
    try:
        client.pull()
        remote.installed()
        trainer.optimizer = remote
        if on_trainer is not None:
            on_trainer(trainer)
        evals = trainer.fit()
        remote.finish()
        return evals
    finally:
        if not remote.finished:
            try:
                client.leave()
            except Exception:     # leaving is a courtesy: the heartbeat time-out drops us anyway
                pass
        client.close()
