"""The pipeline's gradient clipping equals clip_grad_norm_ over the whole model in one process, in float64 and
for small gradients, where a clipping coefficient off by a part in a million shows (from mutation testing: the
trainer tests' float32 tolerance hid it). Run under mpiexec --with-mpi on 2 or 4 ranks."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.nn import Parameter
from disttrain.nn.utils import clip_grad_norm_
from disttrain.parallel import world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode

pytestmark = pytest.mark.mpi(min_size=2)


def stage_parameters(stage, scale):
    """Stage `stage`'s parameters with gradients, the same on every rank that builds them."""
    rng = np.random.default_rng(stage)
    params = [Parameter(np.zeros(shape)) for shape in ((3, 4), (5,))]
    for p in params:
        p.grad = dt.tensor(scale * rng.standard_normal(p.shape))
    return params


@pytest.mark.parametrize("scale,max_norm", [(1e-3, 1e-3), (1.0, 0.5), (1.0, 100.0)])
def test_clipping_over_stages_equals_one_process(scale, max_norm):
    comm = world()
    mode = PipelineMode(comm, stages=comm.size)            # one replica: every rank a stage
    mine = stage_parameters(mode.stage, scale)
    total = mode.clip_grad_norm(mine, max_norm)
    everyone = [p for stage in range(comm.size) for p in stage_parameters(stage, scale)]
    want_total = clip_grad_norm_(everyone, max_norm)
    assert total == pytest.approx(want_total, rel=1e-12)
    want = everyone[2 * mode.stage:2 * mode.stage + 2]
    for got, expected in zip(mine, want):
        np.testing.assert_allclose(got.grad.numpy(), expected.grad.numpy(), rtol=1e-12, atol=0)
