"""Whether the servers can continue a worker's checkpoint: before `ps-cluster --resume` starts anything (from the
snapshot files) and when a resumed worker has joined the servers (from what they answered, worker_mode.py).

A resumed worker 0 continues at its checkpoint's step, but the parameters come from the servers. A server behind
the checkpoint (its snapshots failed, a full disk, a copy of an old one put back, a server restarted from it)
would continue that step from older weights while the run says it resumed there. Every worker checkpoint records
what each server had reached when it was taken, as the server told that worker (worker_mode.checkpoint_record):
the server's update count, the worker's clock there and the clock of the worker's latest push the server had
applied. A server (or its snapshot) holding fewer updates, an older clock of the worker or an older latest push of
it is behind; a checkpoint written without the record is judged by its step (the clock is at least the step).

Each figure only grows while the server keeps its state, so none of the three raises a false alarm. The update
count also grows with the other workers' pushes, and a server moves a joining worker's clock up to the slowest
live one, so after a restart from an old snapshot the other workers can hide a gap in those two; the latest push
is raised by the worker's own pushes alone, which a resumed worker has not made yet when it checks.
"""
from disttrain.paramserver.snapshot import read_meta
from disttrain.train import saving

__all__ = ["check_snapshots_not_behind", "snapshot_holds", "gaps", "refusal"]


def check_snapshots_not_behind(run_dir, snapshot_paths):
    """Raise ValueError (one line: which snapshot is behind which checkpoint, by how much, what to do) when a
    server's snapshot is behind worker 0's newest usable checkpoint in run_dir."""
    checkpoint = saving.load_checkpoint(run_dir)
    holdings = [(str(path), snapshot_holds(read_meta(path))) for path in snapshot_paths]   # read once
    behind = gaps(holdings, checkpoint.meta)
    if behind:
        raise ValueError(refusal(run_dir, checkpoint, holdings, behind, "the servers' snapshots are"))


def snapshot_holds(meta):
    """What a snapshot (its metadata) holds of worker 0: {"updates", "clock", "last_push"} (last_push None: none)."""
    clock, last_push = ((meta.get("workers") or {}).get("0") or [0, None])[:2]
    return {"updates": meta.get("updates", 0), "clock": clock, "last_push": last_push}


def gaps(holdings, checkpoint_meta, worker=0):
    """What each server lacks of what it had reached at the checkpoint, in words ([]: nothing). holdings: one
    (name, {"updates", "clock", "last_push"}) per server, in server order; an updates of None is not known."""
    return [gap for server, (name, holds) in enumerate(holdings)
            if (gap := _gap(name, holds, _reached(checkpoint_meta, server), worker)) is not None]


def refusal(run_dir, checkpoint, holdings, behind, subject, remedy=""):
    """The one-line refusal to resume worker 0's `checkpoint` from servers `behind` it (gaps' words), with what to
    do: `remedy` (e.g. restarting a server from another snapshot), worker 0's older checkpoint in run_dir that
    no server is behind if there is one, or starting over."""
    older = _older_checkpoint_not_behind(run_dir, checkpoint.path, holdings)
    if older is not None:
        remedy += (f"resume from worker 0's older checkpoint {older.path} (step {older.meta['step']}), which they "
                   f"are not behind, by moving the newer ones out of {older.path.parent}, or ")
    return (f"--resume: {subject} behind worker 0's checkpoint {checkpoint.path} (step {checkpoint.meta['step']}): "
            f"{'; '.join(behind)}; resuming would continue that step from older weights: {remedy}start over with "
            f"--overwrite")


def _reached(meta, server):
    """{"clock", "updates", "last_push"} server `server` had reached at the checkpoint (None: not recorded)."""
    record = meta.get("mode") or {}
    servers = record.get("ps_servers") if isinstance(record, dict) else None
    if isinstance(servers, list) and server < len(servers) and isinstance(servers[server], dict):
        reached = servers[server]
        return {"clock": reached.get("clock", 0), "updates": reached.get("updates"),
                "last_push": reached.get("last_push")}
    return {"clock": meta["step"], "updates": None, "last_push": None}


def _gap(name, holds, reached, worker):
    """What server or snapshot `name`, holding `holds`, lacks of `reached`, in words, or None when it holds all."""
    updates = holds["updates"]
    if reached["updates"] is not None and updates is not None and updates < reached["updates"]:
        return f"{name} holds {updates} updates, the checkpoint was taken after {reached['updates']}"
    if reached["last_push"] is not None and (holds["last_push"] is None or holds["last_push"] < reached["last_push"]):
        held = (f"none of worker {worker}'s pushes" if holds["last_push"] is None
                else f"worker {worker}'s pushes up to clock {holds['last_push']}")
        return f"{name} holds {held}, the checkpoint was taken after its push at clock {reached['last_push']}"
    if holds["clock"] < reached["clock"]:
        return (f"{name} holds {holds['clock']} of worker {worker}'s pushes, the checkpoint was taken after "
                f"{reached['clock']}")
    return None


def _older_checkpoint_not_behind(run_dir, newest, holdings):
    """Worker 0's newest checkpoint older than `newest` that no server is behind, or None."""
    for candidate in saving.list_checkpoints(run_dir):
        if saving.step_of(candidate) >= saving.step_of(newest):
            continue
        try:
            checkpoint = saving.load_checkpoint(candidate)
        except saving.CheckpointError:
            continue
        if not gaps(holdings, checkpoint.meta):
            return checkpoint
    return None
