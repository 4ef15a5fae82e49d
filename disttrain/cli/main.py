"""Entry point of the `disttrain` console script: one sub-command per mode of use.

    disttrain run JOB.toml [--set section.key=value ...] [--out DIR] [--resume | --overwrite] [--device cpu|cuda]
                           [--trace FILE [--trace-steps A:B]]
    disttrain launch -n N [--max-restarts R] [--restart-n M] JOB.toml [run options ...]
    disttrain eval JOB.toml --checkpoint DIR [--set section.key=value ...] [--device cpu|cuda]
    disttrain plan JOB.toml [--ranks N] [--budget-mb X] [--set section.key=value ...]
    disttrain demo

Exit status (cli/exit_codes.py): 0 done, 1 failure, 2 unusable job file, options or checkpoint, a memory budget
the job cannot keep (a plan over it, or a step that went over it), or an output directory that holds an earlier
run or that another run is writing into (the message says what and where), 3 stopped by a NaN or infinite loss, gradient norm or weight ([train]
on_nonfinite), 74 a file the run needs could not be written (a full disk, a read-only file system, the output
directory removed), 124 a rank did not arrive within [parallel] timeout_s, 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint.
"""
import argparse
import os
import signal
import sys

from disttrain import trace
from disttrain.cli import launch, plan
from disttrain.cli.common import add_job_arguments, guarded_command
from disttrain.cli.exit_codes import EXIT_SIGNAL, EXIT_USAGE
from disttrain.paramserver import cli as ps_cli


def build_parser():
    parser = argparse.ArgumentParser(prog="disttrain", description="disttrain: distributed deep-learning training")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train an MLP and a small CNN on generated data (no downloads)")

    run = sub.add_parser("run", help="train a job: writes metrics.jsonl, config.toml, curves.png, memory.json, "
                                     "checkpoints/",
                         description="Train the job JOB.toml in the mode its [parallel] mode names (local; data or pipeline under "
                                     "mpiexec). Outputs go to DIR (default "
                                     "runs/<job name>): metrics.jsonl, config.toml (the resolved job), curves.png, "
                                     "memory.json (the memory estimate and measured peak) and checkpoints/. Ctrl-C or SIGTERM writes a checkpoint before exiting; "
                                     "--resume continues from it. A DIR that holds an earlier run's checkpoints "
                                     "needs --resume or --overwrite.")
    add_job_arguments(run, device="where to train")
    run.add_argument("--out", metavar="DIR", help="output directory (default: runs/<job name>)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in DIR/checkpoints that verifies; --set may change "
                            "the lr, clip_norm, the step budget and cadences (README: When things go wrong)")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in a DIR that holds an earlier run: deletes its checkpoints, metrics.jsonl "
                            "and curves.png")
    run.add_argument("--trace", metavar="FILE", help="write a Chrome trace (JSON, per-rank spans: forward, backward, "
                     "each bucket's allreduce, optimizer step, evaluation) of the run to FILE")
    run.add_argument("--trace-steps", type=_step_window, metavar="A:B",
                     help="trace only training steps A to B (and the evaluations after them)")
    launch.register(sub)

    evaluate = sub.add_parser("eval", help="report valid/test perplexity of a checkpoint",
                              description="Evaluate the weights in a job checkpoint, or a parameter-server job's "
                                          "server snapshots, on the valid and test splits.")
    add_job_arguments(evaluate, device="where to evaluate")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR",
                          help="a run directory (its newest checkpoint that verifies), one checkpoint directory "
                               "(DIR/checkpoints/step-NNNNNN), or parameter-server snapshots (DIR/ps-snapshots, or a "
                               "directory of *.snap files)")
    plan.register(sub)
    ps_cli.register(sub)           # ps-cluster, ps-server, ps-worker, ps-keys (disttrain/paramserver/cli.py)
    return parser


def main(argv=None):
    try:              # its output on a full or read-only disk: one line and exit 74
        return guarded_command("disttrain", lambda: _dispatch(build_parser().parse_args(argv)))
    except BrokenPipeError:          # `disttrain ... | head`: the reader left; end quietly, as on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # no second error at interpreter exit
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:        # Ctrl-C before a command handles it (`run` while it loads the job and data)
        print("disttrain: interrupted by SIGINT", file=sys.stderr, flush=True)
        return EXIT_SIGNAL["SIGINT"]


def _dispatch(args):
    if args.command == "demo":
        from disttrain.cli import demo

        return demo.main(args)
    if args.command == "run":
        from disttrain.cli import run

        return run.main(args)
    if args.command == "eval":
        from disttrain.cli import evaluate

        return evaluate.evaluate(args)
    if args.command == "launch":
        return launch.main(args)
    if args.command == "plan":
        return plan.main(args)
    if hasattr(args, "ps_main"):
        return ps_cli.run(args)
    return EXIT_USAGE


def _step_window(text):
    try:
        return trace.parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
