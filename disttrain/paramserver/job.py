"""A parameter-server job: its servers and its workers, built from a JobSpec.

Servers build the model from the job (same seed, so the same initial weights as a local run) and the job's
optimizer and LR schedules over their parts (`server_from_spec`). A worker (`run_worker`) is the ordinary
Trainer in ParameterServerMode (disttrain/paramserver/worker_mode.py): `[parallel] mode = "ps"` trains exactly
what local mode trains; with consistency = "sync" and one worker, bit for bit the same parameters
(tests/paramserver/test_sync_equals_local.py).
"""
import disttrain as dt
from disttrain.paramserver.consistency import Consistency
from disttrain.paramserver.server import ParameterServer, ServerConfig
from disttrain.paramserver.sharding import Layout
from disttrain.paramserver.worker import PSClient
from disttrain.paramserver.worker_mode import ParameterServerMode, worker_run_dir
from disttrain.train import saving
from disttrain.train.build import build_data, build_model, build_optimizer, build_schedules
from disttrain.train.jobspec import JobSpecError
from disttrain.train.loop import Trainer

__all__ = ["initial_model", "server_from_spec", "layout_from_spec", "check_shards", "push_weight", "run_worker",
           "worker_run_dir"]


# ------------------------------------------------------------------------------------------------ from a job

def initial_model(spec):
    """The model a local run of the job starts from (same seed, same weights)."""
    dt.manual_seed(spec.train.seed)
    return build_model(spec, build_data(spec))


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


def _resume(trainer, mode, worker, own_dir, log):
    if own_dir is None:
        raise saving.CheckpointError(f"worker {worker}: resuming needs its run directory (--out)")
    if worker and not saving.list_checkpoints(own_dir):
        log(f"worker {worker}: no checkpoint in {own_dir}: its shard starts again from step 0")
        return
    checkpoint = saving.load_checkpoint(own_dir)
    trainer.restore(checkpoint)
    mode.resuming_from(checkpoint, own_dir)
    log(f"worker {worker}: resuming from {checkpoint.path} {trainer.resume_point()}")


def check_shards(spec, shards, option=None):
    """Raise JobSpecError unless [data] batch_size splits into `shards` equal shares, one per worker (worker K
    trains on share K mod shards). option: the command-line option that gave `shards` (--workers, --shards,
    `disttrain plan --ranks`), which the message then names; None: [ps] workers."""
    batch = spec.data.batch_size
    if batch % shards:
        given, setting = ("", "[ps] workers") if option is None else (f" ({option} {shards})", option)
        raise JobSpecError(f"{spec.source or 'the job'}: [data] batch_size = {batch} cannot be shared by {shards} "
                           f"workers{given}: it must be a multiple of {setting}")


def push_weight(ps, num_shards):
    """What a worker's gradient is multiplied by before it is pushed: 1/num_shards for async and ssp with
    `[ps] scale_pushes` (each push is one shard's part of a step of the whole batch), else 1 (sync averages the
    workers' gradients on the servers)."""
    return 1.0 / num_shards if ps.scale_pushes and ps.consistency != "sync" else 1.0


def run_worker(spec, worker, endpoints, num_shards=None, security=None, out_dir=None, progress=None, log=None,
               on_trainer=None, resume=False, overwrite=False):
    """Train as worker `worker` against the servers at `endpoints`; returns the Trainer's evals (worker 0's count).

    num_shards: how many data shards the streams are cut into (default [ps] workers). on_trainer(trainer) is
    called once the Trainer exists (the CLI uses it to route SIGTERM to trainer.request_stop). out_dir: the run
    directory (None: no outputs, no checkpoints). resume: continue from this worker's checkpoint in
    worker_run_dir(out_dir, worker) (CheckpointError when worker 0 has none; another worker without one starts
    its shard from step 0, and says so). overwrite: start over where an earlier run left its outputs (the
    Trainer's overwrite). Nothing is written into out_dir before the worker has joined every server.
    """
    num_shards = num_shards or spec.ps.workers
    log = log or (lambda text: None)
    ps = spec.ps
    layout = layout_from_spec(spec, len(endpoints))
    client = PSClient(endpoints, layout, worker, security=security, heartbeat_interval=ps.heartbeat_interval,
                      server_timeout=ps.heartbeat_timeout, reconnect_timeout=ps.reconnect_timeout, log=log,
                      timeout_setting="[ps] reconnect_timeout")
    mode = ParameterServerMode(client, worker, num_shards,
                               overlap=ps.overlap and Consistency(ps.consistency, ps.staleness).allows_ahead,
                               grad_weight=push_weight(ps, num_shards))
    try:
        trainer = Trainer.from_job(spec, out_dir=out_dir, mode=mode, progress=progress, overwrite=overwrite)
        if worker:                                # dropout masks differ between workers; weights come from servers
            dt.manual_seed(spec.train.seed + worker)
        if resume:
            _resume(trainer, mode, worker, worker_run_dir(out_dir, worker) if out_dir is not None else None, log)
        if on_trainer is not None:
            on_trainer(trainer)
        return trainer.fit()
    finally:
        mode.close()
