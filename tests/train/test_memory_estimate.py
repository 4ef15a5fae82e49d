"""The memory estimate before the first step (disttrain.train.memory_plan): the prediction from one profiled
forward/backward is within 10% of the peak the Trainer measures (`measured_peak_bytes`, the same sum: the
MemoryMeter's absolute peak plus the optimizer's state) for the LSTM LM, the Transformer LM and a user's MLP;
memory.json holds exactly the named fields; profiling leaves no trace in the run."""
import json
from functools import partial

import numpy as np
import pytest

import disttrain as dt
from disttrain.train.loop import Trainer
from disttrain import nn
from disttrain.parallel.buckets import bucket_layout
from disttrain.tensor.memory import MemoryMeter
from disttrain.train.memory_plan import Holding, held_gradients, holding_for, predict, profile_step

FIELDS = {"params_bytes", "grads_bytes", "optimizer_state_bytes", "activation_bytes", "predicted_peak_bytes"}

JOBS = {
    "lstm_lm": ("model.hidden=64", "model.layers=2", "model.dropout=0.2", "data.batch_size=8", "data.bptt=20"),
    "lstm_lm_sqrt": ("model.hidden=64", "model.layers=2", "data.batch_size=8", "data.bptt=25",
                     'memory.activation_checkpointing="sqrt"', 'optim.kind="sgd"', "optim.momentum=0.9"),
    "transformer_lm": ('model.kind="transformer_lm"', "model.d_model=32", "model.heads=2", "model.layers=2",
                       "model.d_ff=64", "model.max_len=32", "data.bptt=16", "data.batch_size=8"),
    "mlp": ('model.factory="parallel.user_models:classifier"', 'data.factory="parallel.user_models:blobs"',
            "model.hidden=64", "model.layers=2", "data.batch_size=32"),
}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_prediction_within_ten_percent_of_the_measured_peak(tiny_job, tmp_path, name):
    spec = tiny_job(*JOBS[name], "train.max_steps=4", "train.log_every=2")
    trainer = Trainer.from_job(spec, out_dir=tmp_path, progress=False)
    before = json.loads((tmp_path / "memory.json").read_text()) if (tmp_path / "memory.json").exists() else None
    trainer.fit()
    need, measured = trainer.memory_estimate, trainer.measured_peak_bytes
    assert abs(need.predicted_peak - measured) <= 0.1 * measured, (need, measured)
    assert need.optimizer == trainer.optimizer.state_nbytes()
    assert need.parameters == sum(p.data.nbytes for p in trainer.params)
    written = json.loads((tmp_path / "memory.json").read_text())
    assert set(written) == FIELDS | {"measured_peak_bytes"}
    assert written == need.to_json(measured)
    assert before is None                               # written when fit() opens the run, not before


def test_memory_json_before_the_first_metered_step_has_no_measurement(tiny_job, tmp_path):
    trainer = Trainer.from_job(tiny_job("train.max_steps=1"), out_dir=tmp_path, progress=False)
    trainer._open_outputs()
    try:
        assert set(json.loads((tmp_path / "memory.json").read_text())) == FIELDS
    finally:
        trainer._close_outputs()


def test_the_estimate_is_printed_at_start(tiny_job, capsys):
    Trainer.from_job(tiny_job("train.max_steps=1"), progress=False).fit()
    out = capsys.readouterr().out
    assert "memory per process (local):" in out
    for name in ("parameters", "gradients", "optimizer state", "activations", "predicted peak"):
        assert f"\n  {name} " in out


def test_profiling_leaves_no_trace(tiny_job):
    """Same random draws (dropout), same gradients, same buffers afterwards: a run is unchanged by its profile."""
    trainer = Trainer.from_job(tiny_job("model.dropout=0.5", "train.max_steps=1"), progress=False)
    inputs, targets = next(iter(trainer.train_iter))
    for p in trainer.params:
        p.grad = dt.ones_like(p)
    rng = dt.get_rng_state()
    profile_step(trainer.model, inputs, targets)
    assert dt.get_rng_state() == rng
    assert all(np.array_equal(p.grad.numpy(), np.ones(p.shape)) for p in trainer.params)


def test_sharded_and_worker_holdings():
    """ZeRO 1 keeps 1/N of the optimizer state, ZeRO 2 also 1/N of the gradients, a PS worker no optimizer
    state; data parallelism's buckets keep the gradients through the step."""
    model = dt.nn.Linear(10, 10)
    optimizer = dt.optim.Adam(model.parameters())
    profile = profile_step(model, np.ones((4, 10), np.float32), np.zeros(4, np.int64))
    whole = sum(p.data.nbytes for p in model.parameters())
    local = predict(model, optimizer, profile, Holding())
    assert (local.gradients, local.optimizer) == (whole, 2 * whole)
    assert local.peak == whole + 2 * whole + max(whole, profile.working)
    zero1 = predict(model, optimizer, profile, holding_for("data", 4, 1))
    assert (zero1.gradients, zero1.optimizer) == (whole, whole // 2)
    assert zero1.peak == whole + whole // 2 + whole + profile.working
    zero2 = predict(model, optimizer, profile, holding_for("data", 4, 2))
    assert (zero2.gradients, zero2.optimizer) == (whole // 4, whole // 2)
    worker = predict(model, optimizer, profile, holding_for("ps"))
    assert worker.optimizer == 0
    stage = predict(model, optimizer, profile, holding_for("pipeline", stage_activation_bytes=1000, in_flight=3))
    assert stage.activations == 3000 and stage.peak == whole + 2 * whole + whole + 3000


def _stage_two_backward_peak(rows_buckets, imitate_rows):
    """A 16-layer backward's peak (above the parameters) holding the gradients as ZeRO stage 2 at 2 ranks does,
    one layer per bucket."""
    dt.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(16)])
    layout = partial(bucket_layout, bucket_mb=64 * 64 * 4 / 2**20) if imitate_rows else None
    holding = Holding(gradients=0.5, optimizer_state=0.5, gradients_kept=False, rows_buckets=rows_buckets,
                      bucket_layout=layout)
    with MemoryMeter(resident=list(model.parameters())) as meter:
        loss = model(dt.randn(2, 64)).sum()
        with held_gradients(model.parameters(), holding):
            loss.backward()
    return meter.peak_bytes - meter.start_bytes


def test_stage_two_profile_holds_the_send_rows_of_the_buckets_the_reducer_keeps_alive():
    """With the Reducer's layout the profile imitates the send rows: a bucket's rows appear with its first
    gradient and, with at most rows_buckets - 1 collectives running, the oldest is retired when another starts;
    so 3 buckets' rows cost between one and three layers over the shares alone, and rows never retired
    (rows_buckets None) most of the 16."""
    layer = 64 * 64 * 4
    shares_only = _stage_two_backward_peak(3, imitate_rows=False)
    bounded = _stage_two_backward_peak(3, imitate_rows=True) - shares_only
    unbounded = _stage_two_backward_peak(None, imitate_rows=True) - shares_only
    assert layer <= bounded <= 3 * layer, bounded / layer
    assert unbounded >= 15 * layer, unbounded / layer
