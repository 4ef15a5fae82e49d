"""Whether the servers' snapshots can continue worker 0's checkpoint (`ps-cluster --resume`).

A resumed worker 0 continues at its checkpoint's step, but the parameters come from the servers' snapshots. A
snapshot older than the checkpoint (its snapshots failed, a full disk, a copy of an old one) would continue that
step from older weights while the run says it resumed there. Worker 0's checkpoint records what every server had
reached when it was taken, as the server told worker 0 (worker_mode.checkpoint_record): worker 0's clock and the
server's update count. A snapshot is behind when it holds fewer updates, or an older clock of worker 0, than
that; a checkpoint written without the record is judged by its step (worker 0's clock is at least its step).
"""
from disttrain.paramserver.snapshot import read_meta
from disttrain.train import saving

__all__ = ["check_snapshots_not_behind"]


def check_snapshots_not_behind(run_dir, snapshot_paths):
    """Raise ValueError (one line: which snapshot is behind which checkpoint, by how much, what to do) when a
    server's snapshot is behind worker 0's newest usable checkpoint in run_dir."""
    checkpoint = saving.load_checkpoint(run_dir)
    snapshots = [(path, read_meta(path)) for path in snapshot_paths]      # read once, checked against each
    behind = _gaps(snapshots, checkpoint.meta)
    if not behind:
        return
    older = _older_checkpoint_not_behind(run_dir, checkpoint.path, snapshots)
    remedy = (f"resume from worker 0's older checkpoint {older.path} (step {older.meta['step']}), which they are "
              f"not behind, by moving the newer ones out of {older.path.parent}, or start over with --overwrite"
              if older is not None else "start over with --overwrite")
    raise ValueError(f"--resume: the servers' snapshots are behind worker 0's checkpoint {checkpoint.path} (step "
                     f"{checkpoint.meta['step']}): {'; '.join(behind)}; resuming would continue that step from older "
                     f"weights: {remedy}")


def _reached(meta, server):
    """{"clock", "updates"} server `server` had reached at the checkpoint (updates None: not recorded)."""
    record = meta.get("mode") or {}
    servers = record.get("ps_servers") if isinstance(record, dict) else None
    if isinstance(servers, list) and server < len(servers) and isinstance(servers[server], dict):
        return {"clock": servers[server].get("clock", 0), "updates": servers[server].get("updates")}
    return {"clock": meta["step"], "updates": None}


def _gaps(snapshots, checkpoint_meta):
    """What each snapshot lacks of what its server had reached at the checkpoint, in words ([]: nothing)."""
    return [gap for server, (path, meta) in enumerate(snapshots)
            if (gap := _gap(path, meta, _reached(checkpoint_meta, server))) is not None]


def _gap(path, meta, reached):
    """What snapshot `path` (its metadata `meta`) lacks of `reached`, in words, or None when it holds all of it."""
    updates = meta.get("updates", 0)
    clock = (meta.get("workers") or {}).get("0", [0])[0]
    if reached["updates"] is not None and updates < reached["updates"]:
        return f"{path} holds {updates} updates, the checkpoint was taken after {reached['updates']}"
    if clock < reached["clock"]:
        return f"{path} holds {clock} of worker 0's pushes, the checkpoint was taken after {reached['clock']}"
    return None


def _older_checkpoint_not_behind(run_dir, newest, snapshots):
    """Worker 0's newest checkpoint older than `newest` that no snapshot is behind, or None."""
    for candidate in saving.list_checkpoints(run_dir):
        if saving.step_of(candidate) >= saving.step_of(newest):
            continue
        try:
            checkpoint = saving.load_checkpoint(candidate)
        except saving.CheckpointError:
            continue
        if not _gaps(snapshots, checkpoint.meta):
            return checkpoint
    return None
