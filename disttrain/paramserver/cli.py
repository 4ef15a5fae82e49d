"""Sub-commands of parameter-server mode; `register(subparsers)` adds them to the `disttrain` command.

    disttrain ps-cluster JOB.toml [--servers S] [--workers W] [--out DIR] [--resume | --overwrite] [--insecure]
                         [--set k=v ...]
    disttrain ps-server  JOB.toml --index I --bind tcp://HOST:PORT (--keys DIR | --insecure) [--snapshot FILE]
    disttrain ps-worker  JOB.toml --id K --connect tcp://H0:P0,tcp://H1:P1 (--keys DIR | --insecure) [--out DIR]
                         [--resume | --overwrite]
    disttrain ps-keys    DIR --workers W [--client NAME ...]

ps-cluster runs a whole cluster on this machine (keys, S servers, W workers; worker 0 shows progress and writes
metrics; servers log their update rate into DIR/logs). ps-server and ps-worker start the pieces by hand on many
hosts; see launch/ps_multihost.md. Runnable without the `disttrain` script as `python -m disttrain.paramserver.cli`.

Exit status: 0 done, 1 failure (a worker that reaches no server within [ps] reconnect_timeout, a server that
cannot write its final snapshot, and ps-cluster when either happened), 2 unusable job file, options or keys, or an
output directory holding an earlier run (or, with --resume, one whose snapshots are behind worker 0's checkpoint).
"""
import argparse
import signal
import sys
from pathlib import Path

from disttrain.cli.common import (LogWriteError, add_job_arguments, after_write_error, as_output_write_error, fail,
                                  guarded_command, report_final, say_last_line)
from disttrain.cli.exit_codes import EXIT_DONE, EXIT_FAILURE, EXIT_IO


def _security_arguments(parser, client):
    parser.add_argument("--keys", metavar="DIR", help="CURVE key directory (see `disttrain ps-keys`)")
    if client:
        parser.add_argument("--key-name", metavar="NAME", help="this client's key, DIR/private/NAME.key_secret "
                                                               "(default worker-<id>)")
    parser.add_argument("--insecure", action="store_true",
                        help="no authentication or encryption: debugging only, loopback endpoints only")


def register(subparsers):
    """Add ps-cluster, ps-server, ps-worker and ps-keys to an argparse sub-parser set."""
    p = subparsers.add_parser("ps-cluster", help="run a parameter-server cluster (S servers, W workers) here",
                              description="Generate CURVE keys, start S parameter servers and W workers on this "
                                          "machine, restart a server that dies (from its snapshot), and wait for "
                                          "the workers. Outputs in DIR (default runs/<job name>): worker 0's "
                                          "metrics.jsonl, curves.png, checkpoints/; keys/, ps-snapshots/, logs/.")
    add_job_arguments(p, set_example="ps.consistency=ssp")
    p.add_argument("--servers", type=int, metavar="S", help="number of servers (default [ps] servers)")
    p.add_argument("--workers", type=int, metavar="W", help="number of workers (default [ps] workers)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<job name>)")
    p.add_argument("--port", type=int, default=0, metavar="P", help="first server port (default: any free ports)")
    p.add_argument("--insecure", action="store_true", help="no CURVE keys (debugging; the cluster is on loopback)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in DIR: servers from their snapshots, workers from their checkpoints")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in a DIR that holds an earlier run (its outputs are deleted; keys are kept)")
    p.set_defaults(ps_main=cluster_main)

    p = subparsers.add_parser("ps-server", help="run one parameter server",
                              description="Serve part `--index` of the job's parameters until SIGTERM/SIGINT, "
                                          "which writes a final snapshot. Resumes from --snapshot when it exists.")
    add_job_arguments(p, set_example="ps.consistency=ssp")
    p.add_argument("--index", type=int, required=True, metavar="I", help="this server's index, 0 <= I < S")
    p.add_argument("--servers", type=int, metavar="S", help="number of servers (default [ps] servers)")
    p.add_argument("--bind", default="tcp://127.0.0.1:0", metavar="ENDPOINT",
                   help="where to listen (default tcp://127.0.0.1:0, any free port); tcp://*:PORT for other hosts")
    p.add_argument("--endpoint-file", metavar="FILE", help="write the bound endpoint here once listening")
    p.add_argument("--snapshot", metavar="FILE", help="snapshot file (default: none)")
    _security_arguments(p, client=False)
    p.set_defaults(ps_main=server_main)

    p = subparsers.add_parser("ps-worker", help="run one parameter-server worker",
                              description="Train as worker --id against the servers (in server-index order).")
    add_job_arguments(p, set_example="ps.consistency=ssp")
    p.add_argument("--id", type=int, required=True, metavar="K", help="this worker's id (0 = the main worker)")
    p.add_argument("--connect", required=True, metavar="ENDPOINTS",
                   help="comma-separated server endpoints, server 0 first")
    p.add_argument("--shards", type=int, metavar="W", help="data shards (default [ps] workers); worker K trains "
                                                            "on shard K mod W")
    p.add_argument("--out", metavar="DIR", help="the run directory: worker 0's outputs and checkpoint, worker K's "
                                                "checkpoint in DIR/workers/worker-K (default runs/<job name>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from this worker's checkpoint in --out")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in a DIR that holds an earlier run (this worker's checkpoints are deleted; "
                            "worker 0's metrics.jsonl and curves.png too)")
    _security_arguments(p, client=True)
    p.set_defaults(ps_main=worker_main)

    p = subparsers.add_parser("ps-keys", help="generate CURVE keys for a parameter-server cluster",
                              description="Create DIR/server.key(_secret) and a key pair per client, keeping "
                                          "existing ones. Copy DIR/server.key_secret and DIR/clients/ to server "
                                          "hosts, DIR/server.key and DIR/private/worker-K.key_secret to worker K.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--workers", type=int, default=0, metavar="W", help="keys worker-0 .. worker-(W-1)")
    p.add_argument("--client", action="append", default=[], metavar="NAME", help="another client key (repeatable)")
    p.set_defaults(ps_main=keys_main)


def run(args):
    """Dispatch parsed arguments of one of the registered sub-commands."""
    return args.ps_main(args)


# ---------------------------------------------------------------------------------------------- commands

def _spec(args, **ps_overrides):
    from disttrain.train.jobspec import load_job

    extra = [f"ps.{k}={v}" for k, v in ps_overrides.items() if v is not None]
    return load_job(args.job, list(args.overrides) + extra + ["parallel.mode=ps"])


def _usage_errors():
    from disttrain.paramserver.auth import AuthError
    from disttrain.paramserver.snapshot import SnapshotError
    from disttrain.train.saving import CheckpointError
    from disttrain.train.jobspec import JobSpecError

    return (JobSpecError, CheckpointError, AuthError, SnapshotError, ValueError)


def server_main(args):
    from disttrain.paramserver.alerts import ALERT_PREFIX
    from disttrain.paramserver.auth import ServerSecurity, check_insecure_endpoint
    from disttrain.paramserver.job import server_from_spec
    from disttrain.paramserver.server import FinalSnapshotError

    try:
        spec = _spec(args, servers=args.servers)
        security = _server_security(args, ServerSecurity, check_insecure_endpoint)
        server = server_from_spec(spec, args.index, spec.ps.servers, bind=args.bind, security=security,
                                  snapshot_path=args.snapshot)
        endpoint = server.start()
    except _usage_errors() as exc:
        return fail("ps-server", exc)
    print(f"server {args.index}/{spec.ps.servers}: listening on {endpoint} ({spec.ps.consistency}, "
          f"{len(server.keys)} parts, {sum(p.length for p in server.parts.values()):,} parameters"
          f"{', insecure' if security is None else ', CURVE'})", file=sys.stderr, flush=True)
    if args.endpoint_file:
        path = Path(args.endpoint_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(endpoint + "\n")
        tmp.replace(path)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: server.request_stop())
    try:
        server.serve()
    except FinalSnapshotError as exc:      # one line, marked for ps-cluster's terminal (paramserver/alerts.py)
        print(f"{ALERT_PREFIX}{exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    print(f"server {args.index}: stopped after {server.updates} updates"
          + (f"; snapshot {args.snapshot}" if args.snapshot else ""), file=sys.stderr, flush=True)
    return EXIT_DONE


def _server_security(args, ServerSecurity, check_insecure_endpoint):
    if args.insecure:
        check_insecure_endpoint(args.bind)
        return None
    if not args.keys:
        raise ValueError("give --keys DIR (CURVE keys, see `disttrain ps-keys`) or --insecure (loopback only)")
    return ServerSecurity(args.keys)


def worker_main(args):
    from disttrain.paramserver.auth import ClientSecurity, check_insecure_endpoint
    from disttrain.paramserver.job import check_shards, run_worker
    from disttrain.paramserver.worker import PSError
    from disttrain.train.saving import CheckpointError
    from disttrain.train.loop import TrainingInterrupted
    from disttrain.train.outputs import OutputWriteError

    try:
        spec = _spec(args, workers=args.shards)
        endpoints = [e.strip() for e in args.connect.split(",") if e.strip()]
        if len(endpoints) != spec.ps.servers:
            spec = _spec(args, workers=args.shards, servers=len(endpoints))
        check_shards(spec, spec.ps.workers, "--shards" if args.shards else None)
        if args.insecure:
            for e in endpoints:
                check_insecure_endpoint(e)
            security = None
        elif not args.keys:
            raise ValueError("give --keys DIR (CURVE keys) or --insecure (loopback only)")
        else:
            security = ClientSecurity.from_dir(args.keys, args.key_name or f"worker-{args.id}")
    except _usage_errors() as exc:
        return fail("ps-worker", exc)
    out = Path(args.out) if args.out else Path("runs") / Path(args.job).stem
    log = lambda text: print(text, file=sys.stderr, flush=True)     # noqa: E731

    trainers = []

    def on_trainer(trainer):
        trainers.append(trainer)

        def handler(signum, frame):
            trainer.request_stop(signal.Signals(signum).name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    try:
        evals = run_worker(spec, args.id, endpoints, security=security, out_dir=out, log=log, on_trainer=on_trainer,
                           resume=args.resume, overwrite=args.overwrite)
        if args.id == 0:                         # the same final line as `disttrain run`'s
            report_final(evals, trainers[0].data)
    except TrainingInterrupted as exc:
        print(f"worker {args.id}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except PSError as exc:
        print(f"worker {args.id}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CheckpointError as exc:      # an earlier run in --out; --resume: no checkpoint, or one of another job
        return fail("ps-worker", exc)
    except (OutputWriteError, LogWriteError) as exc:   # its checkpoint, metrics, config or log could not be written
        if isinstance(exc, LogWriteError):
            exc = as_output_write_error(exc, trainers[0] if trainers else None)
        say_last_line(f"worker {args.id}: error: {exc}; {after_write_error(exc)}")  # (stderr may be what failed)
        return EXIT_IO
    return EXIT_DONE


def cluster_main(args):
    from disttrain.paramserver.cluster import Cluster

    try:
        spec = _spec(args, servers=args.servers, workers=args.workers)
        out = Path(args.out) if args.out else Path("runs") / Path(args.job).stem
        cluster = Cluster(spec, out, insecure=args.insecure, port=args.port, resume=args.resume,
                          overwrite=args.overwrite)
        cluster.check_run_dir()
    except _usage_errors() as exc:
        return fail("ps-cluster", exc)
    return cluster.run()


def keys_main(args):
    from disttrain.paramserver.auth import generate_keys

    names = [f"worker-{k}" for k in range(args.workers)] + list(args.client)
    directory = generate_keys(args.dir, names)
    print(f"keys in {directory}: server.key, server.key_secret, clients/ ({len(names)} public keys), private/")
    return EXIT_DONE


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m disttrain.paramserver.cli",
                                     description="disttrain parameter-server commands")
    register(parser.add_subparsers(dest="command", required=True))
    return guarded_command("disttrain", lambda: run(parser.parse_args(argv)))   # its log on a full disk: exit 74


if __name__ == "__main__":
    sys.exit(main())
