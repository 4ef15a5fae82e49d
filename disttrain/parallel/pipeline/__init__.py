"""disttrain.parallel.pipeline: the model cut into K stages on K ranks, micro-batches streamed through them.

Modules: blocks (the chain of blocks a model is cut into, Stage: a contiguous run of them).
Importing this package does not initialise MPI.
"""
from disttrain.parallel.pipeline.blocks import Block, Stage, blocks_of

__all__ = ["Block", "Stage", "blocks_of"]
