"""dt.train.fit: your own model and data from Python, with the job keys as keyword settings."""
import json

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.autograd.observe import observe_ops
from disttrain.data.source import ArrayData
from disttrain.train import JobSpecError, fit
from disttrain.train.mode import LocalMode
from disttrain.train.saving import RunExistsError


def blobs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return np.where(labels[:, None] == 1, 1.5, -1.5) + rng.standard_normal((n, 2)), labels


def model():
    dt.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))


def test_fit_trains_evaluates_and_writes_a_run(tmp_path):
    data = ArrayData(*blobs(), batch_size=20, eval={"valid": blobs(60, 1)})
    net = model()
    trainer = fit(net, data, dt.optim.SGD(net.parameters(), lr=0.1), epochs=4, log_every=4, clip_norm=1.0,
                  out_dir=tmp_path, progress=False)
    assert trainer.step == 4 * 12 and trainer.model is net
    assert trainer.evals["valid"].loss < 0.3 and trainer.evals["valid"].tokens == 60
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoints").is_dir()
    config = (tmp_path / "config.toml").read_text()          # what was applied, not a job that never ran
    assert "the model, data and optimizer were Python objects" in config
    assert "[model]" not in config and "[data]" not in config and "lr =" not in config
    assert "clip_norm = 1.0" in config and "epochs = 4" in config


def test_fit_has_glibc_keep_freed_memory_for_the_next_step(tmp_path, monkeypatch):
    import disttrain.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append("retain"))  # process-wide: not for real here
    net = model()
    fit(net, ArrayData(*blobs(), batch_size=20), dt.optim.SGD(net.parameters(), lr=0.1), epochs=1, out_dir=tmp_path,
        progress=False)
    assert calls == ["retain"]


class NormsSeen(LocalMode):
    """The local mode, keeping the gradient norm of every step."""

    def __init__(self):
        self.norms = []

    def clip_grad_norm(self, params, max_norm):
        self.norms.append(super().clip_grad_norm(params, max_norm))
        return self.norms[-1]


def test_each_train_row_reports_the_mean_gradient_norm_of_its_steps(tmp_path):
    net, mode = model(), NormsSeen()
    fit(net, ArrayData(*blobs(), batch_size=20), dt.optim.SGD(net.parameters(), lr=0.1), mode=mode, epochs=1,
        log_every=4, out_dir=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = [row["grad_norm"] for row in rows if row["split"] == "train"]
    assert len(mode.norms) == 12 and got == pytest.approx(np.mean(np.reshape(mode.norms, (3, 4)), axis=1), rel=1e-12)


def test_fit_resumes_to_the_same_weights_as_an_unbroken_run(tmp_path, capsys):
    data = ArrayData(*blobs(), batch_size=20, shuffle=True, seed=3)

    def run(out, epochs, resume=False):
        net = model()
        opt = dt.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        return fit(net, data, opt, epochs=epochs, out_dir=out, resume=resume, progress=False)

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "part", 1)
    with pytest.raises(RunExistsError, match=r"from Python: fit\(\.\.\., resume=True\) or fit\(\.\.\., overwrite=True\)"):
        run(tmp_path / "part", 3)
    capsys.readouterr()
    resumed = run(tmp_path / "part", 3, resume=True)
    said = capsys.readouterr().out
    assert "fit(): resumed with [train] epochs = 3 (the checkpoint's job: 1)" in said, said
    assert f"fit(): resuming from {tmp_path / 'part' / 'checkpoints'}" in said and "at step 12 (epoch 2)" in said
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fit_settings_are_checked_like_a_job_file():
    data = ArrayData(*blobs(), batch_size=20)
    net = model()
    with pytest.raises(TypeError, match="unknown setting 'epoch'.*epochs"):
        fit(net, data, dt.optim.SGD(net.parameters(), lr=0.1), epoch=2)
    with pytest.raises(JobSpecError, match=r"\[train\] epochs = 0"):
        fit(net, data, dt.optim.SGD(net.parameters(), lr=0.1), epochs=0)


def test_a_mode_fit_cannot_run_here_is_refused_with_what_to_run(monkeypatch):
    """mode="ps" used to train locally without a word; data mode outside mpiexec named `disttrain run fit()`."""
    data = ArrayData(*blobs(), batch_size=20)
    net = model()
    with pytest.raises(JobSpecError, match=r'^fit\(\): mode="ps" is not a mode fit\(\) runs: .*disttrain ps-cluster'):
        fit(net, data, dt.optim.SGD(net.parameters(), lr=0.1), mode="ps")
    monkeypatch.setattr("sys.argv", ["train_mine.py"])
    with pytest.raises(JobSpecError, match=r"data mode runs one process per rank: mpiexec -n 2 python train_mine.py, "
                                           r'or set mode = "local"$'):
        fit(net, data, dt.optim.SGD(net.parameters(), lr=0.1), mode="data")


@pytest.mark.parametrize("key, value", [("lr", 0.5), ("momentum", 0.9), ("warmup_steps", 8), ("decay", 0.5)])
def test_a_setting_of_the_optimizer_given_is_refused_not_ignored(key, value):
    data = ArrayData(*blobs(), batch_size=20)
    net = model()
    with pytest.raises(TypeError, match=rf"fit\(\) got {key}=.*\[optim\] {key} describes what fit\(\) is given"):
        fit(net, data, dt.optim.SGD(net.parameters(), lr=0.1), **{key: value})


@pytest.mark.parametrize("setting", ["sqrt", 2])
def test_fit_applies_activation_checkpointing_to_the_model_it_is_given(setting):
    """The job key reaches a model passed as an object, as one built from a job file: the step records
    checkpoint nodes and trains as without them."""
    data = ArrayData(*blobs(), batch_size=20)

    def deep():
        dt.manual_seed(0)
        return nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(2, 2), nn.Tanh())])

    plain, checkpointed = deep(), deep()
    fit(plain, data, dt.optim.SGD(plain.parameters(), lr=0.1), max_steps=3, progress=False)
    recorded = []
    with observe_ops(lambda call: recorded.append(call.op.__name__)):
        fit(checkpointed, data, dt.optim.SGD(checkpointed.parameters(), lr=0.1), max_steps=3, progress=False,
            activation_checkpointing=setting)
    assert checkpointed.checkpoint_segments == setting and "Checkpoint" in recorded
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)


def test_float64_regression_targets_train_a_float32_model(tmp_path):
    """NumPy's default float64 targets are kept in the model's dtype, as the inputs are (an MSE between float32
    outputs and float64 targets was a dtype mismatch)."""
    inputs, _ = blobs()
    targets = inputs.sum(axis=1, keepdims=True)                        # float64
    data = ArrayData(inputs, targets, batch_size=20)
    assert data.targets.dtype == np.float32
    dt.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    net.loss = lambda output, y: dt.nn.functional.mse_loss(output, y)
    trainer = fit(net, data, dt.optim.SGD(net.parameters(), lr=0.05), epochs=2, out_dir=tmp_path / "run", progress=False)
    assert trainer.step == 2 * (len(inputs) // 20)
