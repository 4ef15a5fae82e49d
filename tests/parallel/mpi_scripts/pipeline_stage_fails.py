"""`disttrain run` in pipeline mode where the last stage's forward raises mid-step: the job must end.

    mpiexec -n 2 python pipeline_stage_fails.py JOB.toml OUT_DIR

Stage 0 is then waiting for a gradient that never comes (inside MPI_Wait): only the abort ends it.
"""
import sys

from disttrain.cli.main import main
from disttrain.parallel import world
from disttrain.parallel.pipeline.runtime import PipelineRuntime

if world().rank == world().size - 1:
    original, calls = PipelineRuntime._forward, []

    def failing_forward(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("injected failure in the last stage's forward")
        return original(self, *args)

    PipelineRuntime._forward = failing_forward

sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2]]))
