"""disttrain.parallel.pipeline: the model cut into K stages on K ranks, micro-batches streamed through them.

Modules: blocks (the chain of blocks a model is cut into; Stage: a contiguous run of them), profile (each
block's measured cost), partition (the balancer and Partition, the plain-data cut rank 0 sends the others),
rank_layout (K stages x D replicas over the launched ranks), schedule (each stage's forward/backward actions: GPipe,
1F1B), p2p (StageLink: activations forward, gradients back), runtime (PipelineRuntime: one stage's step),
stage_memory (a stage's step memory, replayed over its schedule), pipeline_mode (PipelineMode: the Trainer's
mode).
Importing this package does not initialise MPI.
"""
from disttrain.parallel.pipeline.blocks import Block, Stage, blocks_of
from disttrain.parallel.pipeline.partition import Partition, balance, partition
from disttrain.parallel.pipeline.profile import Profile

__all__ = ["Block", "Partition", "Profile", "Stage", "balance", "blocks_of", "partition"]
