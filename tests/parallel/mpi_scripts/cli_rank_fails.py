"""`disttrain run` in data mode where rank 1's optimizer step raises after a few steps: the job must end.

    mpiexec -n 2 python cli_rank_fails.py JOB.toml OUT_DIR
"""
import sys

from disttrain import optim
from disttrain.cli.main import main
from disttrain.parallel import world

if world().rank == 1:
    original, calls = optim.Adam.step, []

    def failing_step(self, closure=None):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("injected failure in rank 1's optimizer step")
        return original(self, closure)

    optim.Adam.step = failing_step

sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2]]))
