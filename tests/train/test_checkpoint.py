"""Job checkpoints: contents, validation messages, torch-readable weights, and atomicity under crashes."""
import json
import os
import shutil
import types

import numpy as np
import pytest
from safetensors.numpy import load_file

from disttrain.tensor import kernels_numpy, random
from disttrain.train import Trainer
from disttrain.train import checkpoint as ckpt
from disttrain.train.checkpoint import (FORMAT_VERSION, CheckpointError, find_checkpoint, join_optimizer_state,
                                        load_checkpoint, save_checkpoint, split_optimizer_state)


def _save(run_dir, step, value=0.0):
    model = {"w": np.full((2, 3), value, np.float32), "b": np.arange(3, dtype=np.float32)}
    arrays = {"optimizer.0.exp_avg": np.full((2, 3), value, np.float32)}
    meta = {"step": step, "epoch": 0, "data": {"position": step}, "optimizer": {}, "schedules": {}, "rng": {},
            "metrics": {}, "job": {}}
    return save_checkpoint(run_dir, model, arrays, meta)


def test_round_trip_and_layout(tmp_path):
    path = _save(tmp_path, 7, 1.5)
    assert path == tmp_path / "checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]                  # no temp or .prev left
    assert sorted(os.listdir(path)) == ["model.safetensors", "state.safetensors", "trainer.json"]
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta["format_version"] == FORMAT_VERSION and loaded.meta["step"] == 7
    np.testing.assert_array_equal(loaded.model["w"], np.full((2, 3), 1.5, np.float32))
    np.testing.assert_array_equal(loaded.arrays["optimizer.0.exp_avg"], np.full((2, 3), 1.5, np.float32))
    assert load_checkpoint(path).meta == loaded.meta                       # the checkpoint dir itself works too
    _save(tmp_path, 9)
    assert load_checkpoint(tmp_path).meta["step"] == 9
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_validation_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    path = _save(tmp_path, 1)
    meta_file = path / "trainer.json"
    meta = json.loads(meta_file.read_text())

    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r'trainer.json: "format_version" is 99, this disttrain reads version 1'):
        load_checkpoint(tmp_path)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    with pytest.raises(CheckpointError, match='no "format_version" field'):
        load_checkpoint(tmp_path)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("rng", "data")}))
    with pytest.raises(CheckpointError, match="missing field.*data, rng"):
        load_checkpoint(tmp_path)
    meta_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer.json: unreadable"):
        load_checkpoint(tmp_path)
    meta_file.write_text(json.dumps(meta))
    (path / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="state.safetensors: missing"):
        load_checkpoint(tmp_path)
    (path / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="state.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_half_written_temp_dir_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 5, 5.0)
    # a crash while writing step 10: a temp dir with a torn weights file and no trainer.json
    tmp = tmp_path / "checkpoint.tmp-10"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\":{\"dtype\"")
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta["step"] == 5 and loaded.model["w"][0, 0] == 5.0
    # a crash between the two renames: only checkpoint.prev (complete) and the new temp dir exist
    shutil.copytree(tmp_path / "checkpoint", tmp / "x")            # make the temp dir look nearly done
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.prev")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.prev"
    assert load_checkpoint(tmp_path).meta["step"] == 5
    # the next save cleans up every leftover
    _save(tmp_path, 15, 15.0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and load_checkpoint(tmp_path).meta["step"] == 15


class Crash(Exception):
    pass


def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Kill the save at each of its file-system operations in turn: the old or the new one always loads."""
    real = {"rename": os.rename, "rmtree": shutil.rmtree, "fsync": ckpt.fsync_path, "save_file": ckpt.save_file}
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
        _save(run_dir, 5, 5.0)
        counter["left"] = k
        with monkeypatch.context() as m:
            m.setattr(ckpt.os, "rename", crashing("rename"))
            m.setattr(ckpt.shutil, "rmtree", crashing("rmtree"))
            m.setattr(ckpt, "fsync_path", crashing("fsync"))
            m.setattr(ckpt, "save_file", crashing("save_file"))
            try:
                _save(run_dir, 10, 10.0)
                finished = True
            except Crash:
                finished, crash_points = False, crash_points + 1
        loaded = load_checkpoint(run_dir)
        assert loaded.meta["step"] in ((10,) if finished else (5, 10))
        assert loaded.model["w"][0, 0] == loaded.meta["step"]
        _save(run_dir, 20, 20.0)                                 # and the next save recovers
        assert load_checkpoint(run_dir).meta["step"] == 20 and sorted(os.listdir(run_dir)) == ["checkpoint"]
        if finished:
            break
    assert crash_points >= 8           # two writes, four fsyncs, two renames, one removal at least


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
    trainer = Trainer(tiny_job("train.max_steps=6", "train.checkpoint_every=4", layers=2), out_dir=tmp_path,
                      progress=False)
    trainer.fit()
    loaded = load_checkpoint(tmp_path)
    meta = loaded.meta
    assert meta["step"] == 6 and meta["finished"] and meta["job"] == trainer.spec.to_dict()
    assert meta["data"] == {"position": 6, "bptt": 8, "num_segments": len(trainer.train_iter)}
    assert meta["rng"]["seed"] == 3 and "cpu" in meta["rng"]
    assert meta["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert meta["metrics"]["position"] == (tmp_path / "metrics.jsonl").stat().st_size
    assert sorted(loaded.model) == sorted(trainer.model.state_dict())           # safetensors sorts keys
    for name, t in trainer.model.state_dict().items():
        np.testing.assert_array_equal(loaded.model[name], t.numpy())
    assert loaded.arrays["hidden.h"].shape == (2, 4, 16) and "optimizer.0.exp_avg" in loaded.arrays
    assert load_file(tmp_path / "checkpoint" / "model.safetensors").keys() == loaded.model.keys()


def test_the_device_generator_state_goes_through_a_job_checkpoint(tiny_job, tmp_path):
    """A GPU's random stream (here a stand-in backend named "cuda" on NumPy) is saved and resumed."""
    stand_in = types.SimpleNamespace(name="cuda", xp=np, kernels=kernels_numpy)
    trainer = Trainer(tiny_job("train.max_steps=2"), out_dir=tmp_path, progress=False)
    random.generator(stand_in).random((10,))
    trainer.fit()
    saved = load_checkpoint(tmp_path)
    assert saved.meta["rng"]["cuda"] == {"seed": 3, "offset": 10}
    resumed = Trainer(tiny_job("train.max_steps=4"), progress=False)  # seeds the generators afresh
    resumed.restore(saved)
    try:
        assert random.generator(stand_in).state == {"seed": 3, "offset": 10}
    finally:
        random.manual_seed(0)  # no stand-in generator left for the next tests


def test_model_weights_load_into_torch(tiny_job, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    trainer = Trainer(tiny_job("train.max_steps=2", layers=2), out_dir=tmp_path, progress=False)
    trainer.fit()
    vocab, hidden = len(trainer.corpus.vocab), 16

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
    model.load_state_dict(torch_load(tmp_path / "checkpoint" / "model.safetensors"))   # strict: same names
    inputs, targets = trainer.train_iter.segment(0)
    trainer.model.eval()
    import disttrain as dt
    with dt.no_grad():
        ours, _ = trainer.model(dt.tensor(inputs))
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.array(inputs)))
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_restore_refuses_another_job(tiny_job, tmp_path):
    Trainer(tiny_job("train.max_steps=2"), out_dir=tmp_path, progress=False).fit()
    other = Trainer(tiny_job(hidden=8), progress=False)
    with pytest.raises(CheckpointError, match=r"different job; .*\[model\] hidden: checkpoint 16, job 8"):
        other.restore(load_checkpoint(tmp_path))
