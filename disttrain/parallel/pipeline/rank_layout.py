"""The pipeline layout: K stages x D replicas over the launched processes, checked once.

World rank r is stage r % K of replica r // K; each replica trains on 1/D of every batch, cut into
`micro_batches` equal micro-batches.
"""
from disttrain.train.jobspec import JobSpecError

__all__ = ["PipelineLayoutError", "check_layout"]


class PipelineLayoutError(JobSpecError):
    """The world cannot hold the requested stages x replicas, the batch does not split into micro-batches, or
    the split points do not cut the model."""


def check_layout(world_size, stages, micro_batches, batch_size=None, source=None, ranks_option=None):
    """Raise PipelineLayoutError unless `world_size` processes make whole replicas of `stages` stages and each
    replica's share of `batch_size` splits into `micro_batches` equal micro-batches. ranks_option: the command-line
    option that gave world_size (`disttrain plan --ranks`), which the message then names; None: the processes
    launched."""
    where = f"{source or '<job>'}: "
    if stages < 1 or world_size % stages:
        given, one, two = ((f"but {world_size} processes were launched", f"mpirun -n {stages}", f"-n {2 * stages}")
                           if ranks_option is None else (f"does not fit {ranks_option} {world_size}",
                                                         f"{ranks_option} {stages}", f"{ranks_option} {2 * stages}"))
        raise PipelineLayoutError(f"{where}[parallel] stages = {stages} {given}; expected a world size that is a "
                                  f"multiple of the stages ({one} for one pipeline, {two} for two data-parallel "
                                  f"replicas)")
    replicas = world_size // stages
    if batch_size is not None and (batch_size % replicas or (batch_size // replicas) % micro_batches):
        raise PipelineLayoutError(f"{where}[parallel] micro_batches = {micro_batches}: expected a divisor of the "
                                  f"{batch_size / replicas:g} streams each of the {replicas} replicas trains on "
                                  f"([data] batch_size = {batch_size} / {replicas})")
