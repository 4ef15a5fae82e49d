"""A PipelineMode made directly (a mode object for dt.train.fit, no job file to check) checks its layout."""
import pytest

from disttrain import nn
from disttrain.parallel import world
from disttrain.parallel.pipeline.blocks import ModuleBlock
from disttrain.parallel.pipeline.rank_layout import PipelineLayoutError
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode, check_enough_blocks


@pytest.mark.mpi_skip
def test_a_pipeline_mode_refuses_a_world_that_is_not_whole_replicas_of_its_stages():
    with pytest.raises(PipelineLayoutError, match=r"my job: \[parallel\] stages = 2 but 1 processes were launched"):
        PipelineMode(world(), stages=2, source="my job")


class _Recurrent(nn.Module):
    """A recurrent model cut into blocks, without block_states / state_from_blocks."""
    carries_state = True

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x, state=None):
        return self.second(self.first(x)), state

    def pipeline_blocks(self):
        return [("first", ModuleBlock("first", self.first)), ("second", ModuleBlock("second", self.second))]


def test_a_recurrent_model_without_its_blocks_states_is_refused_before_training():
    with pytest.raises(PipelineLayoutError, match=r'^r.toml: \[parallel\] mode = "pipeline": _Recurrent carries a '
                                                  r"state \(carries_state = True\) but defines no block_states or "
                                                  r"state_from_blocks;") as raised:
        check_enough_blocks(_Recurrent(), 2, "r.toml")
    assert "\n" not in str(raised.value)
