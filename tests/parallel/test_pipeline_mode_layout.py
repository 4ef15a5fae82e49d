"""A PipelineMode made directly (a mode object for dt.train.fit, no job file to check) checks its layout."""
import pytest

from disttrain.parallel import world
from disttrain.parallel.pipeline.rank_layout import PipelineLayoutError
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode


@pytest.mark.mpi_skip
def test_a_pipeline_mode_refuses_a_world_that_is_not_whole_replicas_of_its_stages():
    with pytest.raises(PipelineLayoutError, match=r"my job: \[parallel\] stages = 2 but 1 processes were launched"):
        PipelineMode(world(), stages=2, source="my job")
