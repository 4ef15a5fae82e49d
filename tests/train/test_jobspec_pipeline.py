"""[parallel] keys of pipeline mode: defaults, types and the checks across keys."""
import pytest

from disttrain.train.jobspec import JobSpecError, loads_job

PIPELINE = '[data]\nbatch_size = 8\n[parallel]\nmode = "pipeline"\n'


def test_pipeline_defaults_and_round_trip():
    spec = loads_job(PIPELINE, ["parallel.split_points=[\"lstm.l1\"]"])
    p = spec.parallel
    assert (p.stages, p.micro_batches, p.schedule, p.split_points, p.stage_checkpointing) == (2, 4, "1f1b",
                                                                                              ["lstm.l1"], False)
    assert loads_job(spec.to_toml()) == spec


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(JobSpecError) as err:
        loads_job(PIPELINE, ["parallel.micro_batches=3"], source="jobs/x.toml")
    assert err.value.errors == ["jobs/x.toml: override \"parallel.micro_batches=3\": [parallel] micro_batches = 3: "
                                "expected a divisor of [data] batch_size = 8 (each micro-batch is a share of the "
                                "streams)"]


def test_split_points_count_and_type():
    with pytest.raises(JobSpecError, match=r"split_points = \[1, 2\]: expected stages - 1 = 1 entries"):
        loads_job(PIPELINE + "split_points = [1, 2]\n")
    with pytest.raises(JobSpecError, match=r"split_points = \[0\]: expected a non-empty list of block names"):
        loads_job(PIPELINE + "split_points = [0]\n")
    with pytest.raises(JobSpecError, match=r'schedule = "1fb1": expected one of "1f1b", "gpipe" \(did you mean'):
        loads_job(PIPELINE + 'schedule = "1fb1"\n')


def test_data_mode_ignores_the_pipeline_keys():
    assert loads_job('[data]\nbatch_size = 8\n[parallel]\nmode = "data"\nmicro_batches = 3\n').parallel.mode == "data"
