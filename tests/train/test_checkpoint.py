"""Job checkpoints: contents, validation messages, digests, keeping K (and the best), torch-readable weights,
and atomicity under crashes and failures."""
import hashlib
import json
import math
import os
import shutil
import types

import numpy as np
import pytest
from safetensors.numpy import load_file

from disttrain.tensor import kernels_numpy, random
from disttrain.train import Trainer
from disttrain.train import saving as ckpt
from disttrain.train.saving import (FORMAT_VERSION, CheckpointError, NonFiniteCheckpointError, RunExistsError,
                                        check_no_checkpoints, join_optimizer_state, list_checkpoints, load_checkpoint,
                                        save_checkpoint, split_optimizer_state)


def _save(run_dir, step, value=0.0, valid_loss=None, shape=(2, 3), **keep):
    model = {"w": np.full(shape, value, np.float32), "b": np.arange(3, dtype=np.float32)}
    arrays = {"optimizer.0.exp_avg": np.full(shape, value, np.float32)}
    meta = {"step": step, "epoch": 0, "data": {"position": step}, "optimizer": {}, "schedules": {}, "rng": {},
            "metrics": {}, "job": {}}
    if valid_loss is not None:
        meta["evals"] = {"valid": {"step": step, "loss": valid_loss}}
    return save_checkpoint(run_dir, model, arrays, meta, **keep)


def _steps(run_dir):
    return sorted(os.listdir(run_dir / "checkpoints"))


def _rewrite(path, data):
    """Replace a checkpoint file's bytes and its manifest digest (a valid checkpoint with other contents)."""
    path.write_bytes(data)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def test_round_trip_and_layout(tmp_path):
    path = _save(tmp_path, 7, 1.5)
    assert path == tmp_path / "checkpoints" / "step-000007"
    assert os.listdir(tmp_path) == ["checkpoints"] and _steps(tmp_path) == ["step-000007"]   # no temp left
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors", "state.safetensors", "trainer.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["valid_loss"] is None
    for name in ("model.safetensors", "state.safetensors", "trainer.json"):
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    loaded = load_checkpoint(tmp_path)
    assert loaded.path == path and loaded.skipped == []
    assert loaded.meta["format_version"] == FORMAT_VERSION and loaded.meta["step"] == 7
    np.testing.assert_array_equal(loaded.model["w"], np.full((2, 3), 1.5, np.float32))
    np.testing.assert_array_equal(loaded.arrays["optimizer.0.exp_avg"], np.full((2, 3), 1.5, np.float32))
    assert load_checkpoint(path).meta == loaded.meta                       # the checkpoint dir itself works too
    _save(tmp_path, 9)
    assert load_checkpoint(tmp_path).meta["step"] == 9
    assert load_checkpoint(tmp_path / "checkpoints").meta["step"] == 9
    _save(tmp_path, 1234567)                                               # wider than six digits still sorts
    assert _steps(tmp_path) == ["step-000009", "step-1234567"] and load_checkpoint(tmp_path).meta["step"] == 1234567


def test_keeps_the_newest_k_and_with_keep_best_the_lowest_valid_loss(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path / "two", step)
    assert _steps(tmp_path / "two") == ["step-000020", "step-000030"]     # keep_checkpoints defaults to 2
    for step in (10, 20, 30, 40):
        _save(tmp_path / "three", step, keep=3)
    assert _steps(tmp_path / "three") == ["step-000020", "step-000030", "step-000040"]
    losses = {10: 3.0, 20: 2.0, 30: None, 40: 2.5, 50: 2.2}
    for step, loss in losses.items():
        _save(tmp_path / "best", step, valid_loss=loss, keep=2, keep_best=True)
    assert _steps(tmp_path / "best") == ["step-000020", "step-000040", "step-000050"]
    assert json.loads((tmp_path / "best/checkpoints/step-000020/manifest.json").read_text())["valid_loss"] == 2.0
    _save(tmp_path / "best", 60, valid_loss=1.0, keep=2, keep_best=True)   # a new best replaces the old one
    assert _steps(tmp_path / "best") == ["step-000050", "step-000060"]
    _save(tmp_path / "best", 70, keep=1)                                   # keep_best off again: newest only
    assert _steps(tmp_path / "best") == ["step-000070"]


def test_keep_zero_with_keep_best_keeps_only_the_best(tmp_path):
    for step, loss in {10: 2.0, 20: 1.0, 30: 3.0}.items():
        _save(tmp_path, step, valid_loss=loss, keep=0, keep_best=True)
    assert _steps(tmp_path) == ["step-000020"]


def test_a_meta_without_a_step_is_saved_as_step_0_throughout(tmp_path):
    path = save_checkpoint(tmp_path, {"w": np.zeros(2, np.float32)}, {}, {})
    assert path.name == "step-000000"
    assert json.loads((path / "manifest.json").read_text())["step"] == 0


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 5, 2.0)
    assert _steps(tmp_path) == ["step-000005"] and load_checkpoint(tmp_path).model["w"][0, 0] == 2.0


def test_validation_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    path = _save(tmp_path, 1)
    meta_file = path / "trainer.json"
    meta = json.loads(meta_file.read_text())

    _rewrite(meta_file, json.dumps({**meta, "format_version": 99}).encode())
    with pytest.raises(CheckpointError, match=r'trainer.json: "format_version" is 99, this disttrain reads version 3'):
        load_checkpoint(path)
    _rewrite(meta_file, json.dumps({k: v for k, v in meta.items() if k != "format_version"}).encode())
    with pytest.raises(CheckpointError, match='no "format_version" field'):
        load_checkpoint(path)
    _rewrite(meta_file, json.dumps({k: v for k, v in meta.items() if k not in ("rng", "data")}).encode())
    with pytest.raises(CheckpointError, match="missing field.*data, rng"):
        load_checkpoint(path)
    _rewrite(meta_file, b"{not json")
    with pytest.raises(CheckpointError, match="trainer.json: unreadable"):
        load_checkpoint(path)
    _rewrite(meta_file, json.dumps(meta).encode())
    _rewrite(path / "state.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="state.safetensors: not a readable safetensors file"):
        load_checkpoint(path)
    (path / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="state.safetensors: missing"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing; the checkpoint directory .* is incomplete"):
        load_checkpoint(path)


def test_overwritten_bytes_are_detected_and_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 10, 1.0, shape=(20, 30))
    newest = _save(tmp_path, 20, 2.0, shape=(20, 30))
    weights = newest / "model.safetensors"
    with open(weights, "r+b") as fh:                       # 400 bytes of the weights' data overwritten in place
        fh.seek(weights.stat().st_size - 400)
        fh.write(b"\xff" * 400)
    with pytest.raises(CheckpointError, match=r"step-000020/model.safetensors: sha256 .* differs from the manifest"):
        load_checkpoint(newest)                            # a named checkpoint: that one or an error
    loaded = load_checkpoint(tmp_path)                     # a run directory: the newest that verifies
    assert loaded.meta["step"] == 10 and loaded.model["w"][0, 0] == 1.0
    [line] = loaded.skipped
    assert line.startswith(f"checkpoint {newest} is unusable: {weights}: sha256") and "using " in line
    assert line.endswith(f"using {tmp_path / 'checkpoints' / 'step-000010'} instead")
    with open(tmp_path / "checkpoints/step-000010/state.safetensors", "ab") as fh:
        fh.write(b"x")                                     # both damaged: the error names each
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step-000020.*sha256.*step-000010.*bytes"):
        load_checkpoint(tmp_path)


def test_a_malformed_manifest_entry_is_damage_and_resume_falls_back(tmp_path):
    _save(tmp_path, 10, 1.0)
    newest = _save(tmp_path, 20, 2.0)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = 5
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r'manifest.json: the entry for model.safetensors is 5, not an object '
                                              r'with "bytes" and "sha256"; the manifest is damaged'):
        load_checkpoint(newest)
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta["step"] == 10 and loaded.skipped[0].startswith(f"checkpoint {newest} is unusable: ")


def test_half_written_temp_dir_and_a_lone_prev_dir(tmp_path):
    _save(tmp_path, 5, 5.0)
    # a crash while writing step 10: a temp dir with a torn weights file and no manifest
    tmp = tmp_path / "checkpoints" / "step-000010.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\":{\"dtype\"")
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta["step"] == 5 and loaded.model["w"][0, 0] == 5.0 and not loaded.skipped
    # a crash between the two renames of re-saving step 5: only step-000005.prev (complete) is there
    os.rename(tmp_path / "checkpoints" / "step-000005", tmp_path / "checkpoints" / "step-000005.prev")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step-000005.prev"]
    assert load_checkpoint(tmp_path).meta["step"] == 5
    # the next save cleans up the temp dir
    _save(tmp_path, 15, 15.0)
    assert _steps(tmp_path) == ["step-000005.prev", "step-000015"] and load_checkpoint(tmp_path).meta["step"] == 15


class Crash(Exception):
    pass


def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Fail the save at each of its file-system operations in turn: the old or the new one always loads."""
    real = {"rename": os.rename, "rmtree": shutil.rmtree, "fsync": ckpt.fsync_path, "write": ckpt._write_file}
    counter = {"left": 0}

    def crashing(name):
        def op(*args, **kwargs):
            if counter["left"] == 0:
                raise Crash(name)
            counter["left"] -= 1
            return real[name](*args, **kwargs)
        return op

    crash_points = 0
    for k in range(100):
        run_dir = tmp_path / f"run{k}"
        _save(run_dir, 5, 5.0, keep=1)
        counter["left"] = k
        with monkeypatch.context() as m:
            m.setattr(ckpt.os, "rename", crashing("rename"))
            m.setattr(ckpt.shutil, "rmtree", crashing("rmtree"))
            m.setattr(ckpt, "fsync_path", crashing("fsync"))
            m.setattr(ckpt, "_write_file", crashing("write"))
            try:
                _save(run_dir, 10, 10.0, keep=1)
                finished = True
            except Crash:
                finished, crash_points = False, crash_points + 1
        loaded = load_checkpoint(run_dir)
        assert loaded.meta["step"] in ((10,) if finished else (5, 10)) and not loaded.skipped
        assert loaded.model["w"][0, 0] == loaded.meta["step"]
        _save(run_dir, 20, 20.0, keep=1)                         # and the next save recovers
        assert load_checkpoint(run_dir).meta["step"] == 20 and _steps(run_dir) == ["step-000020"]
        if finished:
            break
    assert crash_points >= 8           # four writes, two fsyncs, a rename, a removal at least


def test_a_failing_save_leaves_no_temp_dir_and_a_nonfinite_one_writes_nothing(tmp_path, monkeypatch):
    _save(tmp_path, 5, 5.0)

    def full_disk(path, data):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_write_file", full_disk)
        with pytest.raises(OSError, match="No space left"):
            _save(tmp_path, 10, 10.0)
    assert _steps(tmp_path) == ["step-000005"]
    with pytest.raises(NonFiniteCheckpointError, match="not writing a checkpoint of step 10: model w holds nan"):
        _save(tmp_path, 10, math.nan)
    with pytest.raises(NonFiniteCheckpointError, match=r"trainer.json\['evals'\]\['valid'\]\['loss'\] holds inf"):
        _save(tmp_path, 10, valid_loss=math.inf)
    assert _steps(tmp_path) == ["step-000005"]


def test_a_new_run_refuses_a_directory_holding_checkpoints(tmp_path):
    check_no_checkpoints(tmp_path / "absent")
    (tmp_path / "checkpoints").mkdir()
    check_no_checkpoints(tmp_path)                                       # an empty checkpoints/ holds no run
    _save(tmp_path, 30)
    with pytest.raises(RunExistsError, match=r"holds an earlier run \(1 checkpoint\(s\), the newest of step 30\): "
                                             r"continue it with --resume, or start over with --overwrite"):
        check_no_checkpoints(tmp_path)


def test_optimizer_state_split_and_join():
    sd = {"state": {0: {"step": 3, "exp_avg": np.ones(2)}, 2: {"momentum_buffer": np.zeros(3)}},
          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1, 2]}]}
    arrays, rest = split_optimizer_state(sd)
    assert set(arrays) == {"optimizer.0.exp_avg", "optimizer.2.momentum_buffer"}
    back = join_optimizer_state(arrays, json.loads(json.dumps(rest)))
    assert back["state"][0]["step"] == 3 and back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["param_groups"][0]["params"] == [0, 1, 2]
    np.testing.assert_array_equal(back["state"][2]["momentum_buffer"], np.zeros(3))


def test_trainer_checkpoint_contents(tiny_job, tmp_path):
    trainer = Trainer.from_job(tiny_job("train.max_steps=6", "train.checkpoint_every=4", layers=2), out_dir=tmp_path,
                      progress=False)
    trainer.fit()
    loaded = load_checkpoint(tmp_path)
    meta = loaded.meta
    assert meta["step"] == 6 and meta["finished"] and meta["job"] == trainer.spec.to_dict()
    assert meta["data"] == {"position": 6, "bptt": 8, "num_segments": len(trainer.train_iter)}
    assert meta["rng"]["seed"] == 3 and "cpu" in meta["rng"]
    assert meta["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert meta["metrics"]["position"] == (tmp_path / "metrics.jsonl").stat().st_size
    assert meta["metrics"]["rows"] == len((tmp_path / "metrics.jsonl").read_text().splitlines())
    assert sorted(loaded.model) == sorted(trainer.model.state_dict())           # safetensors sorts keys
    for name, t in trainer.model.state_dict().items():
        np.testing.assert_array_equal(loaded.model[name], t.numpy())
    assert loaded.arrays["state.0"].shape == (2, 4, 16) and "optimizer.0.exp_avg" in loaded.arrays
    assert load_file(loaded.path / "model.safetensors").keys() == loaded.model.keys()


def test_the_device_generator_state_goes_through_a_job_checkpoint(tiny_job, tmp_path):
    """A GPU's random stream (here a stand-in backend named "cuda" on NumPy) is saved and resumed."""
    stand_in = types.SimpleNamespace(name="cuda", xp=np, kernels=kernels_numpy)
    trainer = Trainer.from_job(tiny_job("train.max_steps=2"), out_dir=tmp_path, progress=False)
    random.generator(stand_in).random((10,))
    trainer.fit()
    saved = load_checkpoint(tmp_path)
    assert saved.meta["rng"]["cuda"] == {"seed": 3, "offset": 10}
    resumed = Trainer.from_job(tiny_job("train.max_steps=4"), progress=False)  # seeds the generators afresh
    resumed.restore(saved)
    try:
        assert random.generator(stand_in).state == {"seed": 3, "offset": 10}
    finally:
        random.manual_seed(0)  # no stand-in generator left for the next tests


def test_model_weights_load_into_torch(tiny_job, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    trainer = Trainer.from_job(tiny_job("train.max_steps=2", layers=2), out_dir=tmp_path, progress=False)
    trainer.fit()
    vocab, hidden = trainer.data.vocab_size, 16

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, hidden)
            self.lstm = torch.nn.LSTM(hidden, hidden, 2)
            self.decoder = torch.nn.Linear(hidden, vocab)

        def forward(self, tokens):
            out, _ = self.lstm(self.embedding(tokens))
            return self.decoder(out.reshape(-1, hidden))

    model = TorchLM()
    model.load_state_dict(torch_load(load_checkpoint(tmp_path).path / "model.safetensors"))   # strict: same names
    inputs, targets = trainer.train_iter.segment(0)
    trainer.model.eval()
    import disttrain as dt
    with dt.no_grad():
        ours, _ = trainer.model(dt.tensor(inputs))
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.array(inputs)))
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_restore_refuses_another_job(tiny_job, tmp_path):
    Trainer.from_job(tiny_job("train.max_steps=2"), out_dir=tmp_path, progress=False).fit()
    other = Trainer.from_job(tiny_job(hidden=8), progress=False)
    with pytest.raises(CheckpointError, match=r"different job; .*\[model\] hidden: checkpoint 16, job 8"):
        other.restore(load_checkpoint(tmp_path))



def scripted_valid_losses(trainer, losses):
    """Make the trainer's valid evaluations report losses[step] (so that which step is best is known)."""
    real = trainer.evaluate

    def evaluate(split):
        result = real(split)
        if split == "valid":
            result.loss = losses[trainer.step]
        return result
    trainer.evaluate = evaluate


def test_the_trainer_keeps_its_newest_checkpoints_and_with_keep_best_the_best_one(tiny_job, tmp_path, monkeypatch):
    saved = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *args, **kw: saved.append(args[3]["step"]) or real_save(
        *args, **kw))
    job = ("train.checkpoint_every=4", "train.eval_every=3", "train.keep_best=true")
    losses = {3: 2.0, 6: 1.5, 9: 1.8, 12: 1.9, 15: 1.7, 18: 1.6, 20: 1.55}
    trainer = Trainer.from_job(tiny_job("train.max_steps=15", *job), out_dir=tmp_path, progress=False)
    scripted_valid_losses(trainer, losses)
    trainer.fit()
    assert saved == [3, 4, 6, 8, 12, 15]                # every 4 steps, at each new best (3, 6), and at the end
    assert _steps(tmp_path) == ["step-000006", "step-000012", "step-000015"]     # the newest two and the best
    valid_loss = lambda step: json.loads(                                          # noqa: E731
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "manifest.json").read_text())["valid_loss"]
    assert [valid_loss(6), valid_loss(12), valid_loss(15)] == [1.5, 1.9, 1.7]

    saved.clear()
    resumed = Trainer.from_job(tiny_job("train.max_steps=20", *job), out_dir=tmp_path, progress=False)
    resumed.restore(load_checkpoint(tmp_path))
    scripted_valid_losses(resumed, losses)
    resumed.fit()
    assert saved == [16, 20, 20]         # 18's 1.6 is no new best (the best so far was restored); 20 again: the end
    assert _steps(tmp_path) == ["step-000006", "step-000016", "step-000020"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc (Linux)")
def test_metrics_are_durable_before_a_checkpoint_records_their_position(tiny_job, tmp_path, monkeypatch):
    """A power loss must not leave metrics.jsonl shorter than a checkpoint says: its rows are fsynced first."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.relpath(path, tmp_path), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    trainer = Trainer.from_job(tiny_job("train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1"),
                               out_dir=tmp_path, progress=False)
    trainer.fit()
    paths = [path for path, _ in synced]
    for step in (2, 4):                   # step 4 is saved twice (checkpoint_every, then the finished run): the last
        position = load_checkpoint(tmp_path / "checkpoints" / f"step-{step:06d}").meta["metrics"]["position"]
        last_save = len(paths) - paths[::-1].index(f"checkpoints/step-{step:06d}.tmp/model.safetensors") - 1
        assert ("metrics.jsonl", position) in synced[:last_save]
