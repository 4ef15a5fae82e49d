"""The `disttrain` console script's entry point, outside the disttrain package on purpose.

A console script imports its function's module, and any module of disttrain first runs `import disttrain`
(NumPy, the kernels: a few tenths of a second) before disttrain.cli.main can handle a Ctrl-C. This module
imports nothing of disttrain until its main() runs, so a Ctrl-C during that import is one line and status 130,
as one during the command is, not a KeyboardInterrupt traceback.
"""
import signal
import sys

__all__ = ["main"]


def main():
    try:
        from disttrain.cli.main import main as disttrain_main
    except KeyboardInterrupt:
        print("disttrain: interrupted by SIGINT", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT           # disttrain.cli.exit_codes.EXIT_SIGNAL["SIGINT"], not imported yet
    return disttrain_main()
