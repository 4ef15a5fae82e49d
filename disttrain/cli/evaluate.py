"""`disttrain eval JOB --checkpoint PATH`: valid and test perplexity of saved weights.

PATH is a job checkpoint (a run directory holding checkpoints/, or one checkpoint directory) or the
snapshots of a parameter-server job's servers (a directory of `*.snap` files, one per server: a ps-cluster
run's OUT/ps-snapshots, or that run directory when it holds no checkpoints/). A checkpoint is checked to be
written for this job's model and data; snapshots to be written by the servers of this model (the layout
fingerprint every server records). Errors: one line, exit status 2.

NOTE (buffers): snapshots hold the parameters only. A model's persistent buffers (running statistics) are
updated by each worker and never reach the servers, so the snapshots of a model with buffers are refused, and
the message names worker 0's checkpoint (OUT/checkpoints, written by ps-cluster's worker 0), which holds them.
"""
import sys
from pathlib import Path

import numpy as np

import disttrain as dt
from disttrain.cli import preflight
from disttrain.cli.common import fail, load_job_for, report_final
from disttrain.cli.exit_codes import EXIT_DONE
from disttrain.parallel.mpi_job import launched_size
from disttrain.nn.parameter import Parameter
from disttrain.paramserver.protocol import show
from disttrain.paramserver.sharding import Layout
from disttrain.paramserver.snapshot import SnapshotError, load_snapshot
from disttrain.train.saving import CheckpointError, holds_checkpoint, load_checkpoint
from disttrain.train.jobspec import JobSpecError
from disttrain.train.loop import Trainer, epoch_label

__all__ = ["evaluate", "find_snapshots", "load_snapshots"]

SNAPSHOT_DIR = "ps-snapshots"        # where ps-cluster's servers write theirs


def evaluate(args):
    """disttrain eval JOB.toml --checkpoint PATH [--set k=v ...] [--device cpu|cuda]."""
    try:
        if launched_size() > 1:                  # every rank would evaluate the whole splits and print them
            raise JobSpecError(f"disttrain eval runs in one process; {launched_size()} were launched: run it "
                               "without mpiexec")
        spec = load_job_for(args, "eval")
        preflight.check_job_file(args.job)
        trainer = Trainer.from_job(spec, progress=False)
        loaded = _load_weights(trainer, args.checkpoint)
    except (JobSpecError, CheckpointError, SnapshotError) as exc:
        return fail("eval", exc)
    print(loaded, flush=True)
    evals = {split: trainer.evaluate(split) for split in trainer.data.eval_splits}
    report_final(evals, trainer.data)
    return EXIT_DONE


def _load_weights(trainer, path):
    """Load a checkpoint's or the servers' snapshots' weights into trainer.model; returns what was loaded, in words."""
    if holds_checkpoint(path):
        checkpoint = load_checkpoint(path)
        trainer.load_weights(checkpoint)     # checks it was written for this job's model and data
        meta = checkpoint.meta
        epoch = epoch_label(meta["epoch"], meta["data"]["position"])
        for line in checkpoint.skipped:
            print(f"disttrain eval: {line}", file=sys.stderr, flush=True)
        return f"checkpoint {checkpoint.path} (step {meta['step']}, epoch {epoch})"
    files = find_snapshots(path)
    if files is None:
        raise CheckpointError(f"no checkpoint in {path}: expected a job checkpoint ({Path(path) / 'checkpoints'}/step-NNNNNN) or "
                              f"parameter-server snapshots (*.snap files in {path} or {Path(path) / SNAPSHOT_DIR})")
    _refuse_buffers(trainer.model, files[0].parent)
    metas = load_snapshots(files, trainer.model)
    return (f"parameter-server snapshots {files[0].parent} ({len(files)} server(s), "
            f"{min(m['updates'] for m in metas)} updates)")


def _refuse_buffers(model, snapshot_dir):
    """SnapshotError when `model` has persistent buffers, which snapshots lack: it names worker 0's checkpoint."""
    buffers = [name for name, value in model.state_dict(keep_vars=True).items() if not isinstance(value, Parameter)]
    if not buffers:
        return
    run_dir = snapshot_dir.parent if snapshot_dir.name == SNAPSHOT_DIR else snapshot_dir
    raise SnapshotError(f"{snapshot_dir}: parameter-server snapshots hold the parameters only, and this model has "
                        f"{len(buffers)} persistent buffer(s) ({show(buffers)}), which the workers update and the "
                        f"servers never see: evaluate worker 0's checkpoint instead: --checkpoint {run_dir} "
                        f"(ps-cluster's worker 0 writes it to {run_dir / 'checkpoints'})")


def find_snapshots(path):
    """The `*.snap` files at `path` (a directory of them, or a run directory holding ps-snapshots/), or None."""
    path = Path(path)
    for directory in (path, path / SNAPSHOT_DIR):
        files = sorted(directory.glob("*.snap")) if directory.is_dir() else []
        if files:
            return files
    return None


def load_snapshots(files, model):
    """Put the parameters the servers' snapshot `files` hold (every server's, one file each) into `model`;
    returns the snapshots' metadata. SnapshotError when a server is missing or wrote another model's parts."""
    snapshots = [load_snapshot(f) for f in files]
    servers = snapshots[0][1].get("servers")
    indices = sorted(meta.get("server") for _, meta in snapshots)
    if indices != list(range(servers or 0)):
        raise SnapshotError(f"{files[0].parent}: snapshots of servers {indices}, expected one of each of servers "
                            f"0..{(servers or 1) - 1} (the job's {servers} server(s))")
    named = list(model.named_parameters())
    layout = Layout.from_named_arrays(named, servers)
    flats = [np.empty(p.size, dtype=p.dtype) for p in layout.params]
    for (arrays, meta), file in zip(snapshots, files):
        if meta.get("fingerprint") != layout.fingerprint:
            raise SnapshotError(f"{file}: written by the servers of another model or server count than this job's "
                                f"({servers} server(s), {layout.total:,} parameters)")
        for part in layout.parts_of(meta["server"]):
            flats[part.param][part.offset:part.offset + part.length] = arrays[f"param.{part.key}"].reshape(-1)
    with dt.no_grad():
        for (_, param), flat, spec in zip(named, flats, layout.params):
            param.copy_(flat.reshape(spec.shape))
    return [meta for _, meta in snapshots]
