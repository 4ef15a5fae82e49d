"""The memory estimate in pipeline mode (run under mpiexec --with-mpi): every stage's prediction, from two of its
micro-batches measured at prepare and replayed over its schedule, is within 10% of the peak that stage measures
(its replicas' largest), for the LSTM LM and the Transformer LM, 1F1B and GPipe (with and without stage
checkpointing), on 2 stages, and at 4 ranks
also 4 stages and 2 stages x 2 replicas."""
import pytest

from disttrain.parallel import world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode
from disttrain.train import Trainer

pytestmark = pytest.mark.mpi(min_size=2)

MODELS = {"lstm": """
[model]
hidden = 64
embed = 16
layers = 3
""", "transformer": """
[model]
kind = "transformer_lm"
d_model = 32
heads = 2
layers = 4
d_ff = 128
max_len = 16
dropout = 0.0
"""}

RUN = """
[data]
kind = "chars"
path = "{path}"
batch_size = 8
bptt = 16
[optim]
kind = "adam"
[train]
max_steps = 3
log_every = 1
checkpoint_every = 0
[parallel]
mode = "pipeline"
micro_batches = 4
"""


def layouts():
    """stages for this world: all ranks one pipeline, and with 4 ranks also 2 stages x 2 replicas."""
    size = world().size
    return [size] + ([2] if size == 4 else [])


@pytest.mark.parametrize("stages", layouts())
@pytest.mark.parametrize("schedule,recompute", [("1f1b", False), ("gpipe", False), ("gpipe", True)])
@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_each_stage_prediction_within_ten_percent(char_job, model, schedule, recompute, stages):
    spec = char_job(MODELS[model] + RUN, 3000)(
        f"parallel.schedule={schedule}", f"parallel.stages={stages}",
        f"parallel.stage_checkpointing={str(recompute).lower()}")
    mode = PipelineMode.from_spec(spec, world())
    trainer = Trainer.from_job(spec, mode=mode, progress=False)
    trainer.fit()
    need, measured = trainer.memory_estimate, trainer.measured_peak_bytes
    mode.close()
    assert abs(need.predicted_peak - measured) <= 0.1 * measured, (mode.stage, need, measured)
