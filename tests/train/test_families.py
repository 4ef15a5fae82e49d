"""A model family is one record in train/families.py: a family registered from here, with a key of its own, is a
[model] kind that a job names, sets with --set, builds, describes, estimates and trains, with no other change."""
import json

import numpy as np
import pytest

from disttrain import nn
from disttrain.cli.main import main
from disttrain.train.build import describe_model
from disttrain.train.families import ModelFamily, ModelKey, family_of, register_family, unregister_family
from disttrain.train.jobspec import Int, JobSpecError, load_job, loads_job
from disttrain.train.loop import Trainer
from disttrain.train.memory_plan import check_fits, estimate, parameter_count

JOB = '[model]\nkind = "bag_lm"\n[data]\nkind = "default_corpus"\nmax_bytes = 3000\nbatch_size = 4\nbptt = 8\n' \
      '[optim]\nkind = "adam"\nlr = 0.01\n[train]\nmax_steps = 4\nlog_every = 1\ncheckpoint_every = 0\n'


class BagOfEmbeddingsLM(nn.Module):
    """Each token's embedding -> logits of the next token: forward(tokens (T, B)) -> logits (T*B, V)."""

    def __init__(self, vocab_size, width):
        super().__init__()
        self.embedding, self.decoder = nn.Embedding(vocab_size, width), nn.Linear(width, vocab_size)

    def forward(self, tokens):
        return self.decoder(self.embedding(tokens).reshape((-1, self.embedding.weight.shape[1])))


def _build(spec, vocab_size):
    return BagOfEmbeddingsLM(vocab_size, spec.model.bag_width)


BAG_LM = ModelFamily(
    kind="bag_lm",
    keys=(ModelKey("bag_width", Int(gt=0), 12, "12", "bag_lm: embedding width"),),
    build=_build,
    describe=lambda m: f"bag of {m.bag_width}-wide embeddings",
    parameter_count=lambda m, vocab: 2 * vocab * m.bag_width + vocab,
    activation_floats=lambda spec, vocab: spec.data.bptt * (spec.model.bag_width + 2 * vocab),
    width=lambda m: f"bag_width = {m.bag_width}",
)


@pytest.fixture
def bag_lm():
    register_family(BAG_LM)
    yield BAG_LM
    unregister_family("bag_lm")


def test_a_registered_family_is_a_kind_a_job_names_builds_estimates_and_trains(bag_lm, tmp_path):
    job = tmp_path / "bag.toml"
    job.write_text(JOB)
    spec = load_job(job, ["model.bag_width=6"])
    assert spec.model.bag_width == 6 and spec.model.hidden is None and spec.model.d_model is None
    assert loads_job(JOB).model.bag_width == 12                      # its default
    assert describe_model(spec) == "bag of 6-wide embeddings"
    assert loads_job("").model.bag_width is None                    # unset for the other families
    with pytest.raises(JobSpecError, match=r'\[model\] bag_width = 6: kind = "lstm_lm" does not use it'):
        loads_job("[model]\nbag_width = 6\n")

    out = tmp_path / "run"
    trainer = Trainer.from_job(spec, out_dir=out, progress=False)
    assert isinstance(trainer.model, BagOfEmbeddingsLM) and trainer.model.embedding.weight.shape[1] == 6
    vocab = trainer.data.vocab_size
    assert parameter_count(spec, vocab) == sum(p.numel() for p in trainer.params)
    need = estimate(spec, vocab, streams=4)
    assert need.activations == 4 * 8 * (6 + 2 * vocab) * 4
    with pytest.raises(JobSpecError, match=r"\(\[model\] bag_width = 6, layers = 2, vocabulary"):
        check_fits(spec, vocab, streams=4, available=1)

    before = [p.numpy().copy() for p in trainer.params]
    trainer.fit()
    assert trainer.step == 4
    assert any(not np.array_equal(a, p.numpy()) for a, p in zip(before, trainer.params))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "train"] == [1, 2, 3, 4]
    assert 'kind = "bag_lm"' in (out / "config.toml").read_text()


def test_disttrain_run_checks_logs_and_trains_a_registered_family(bag_lm, tmp_path, capsys):
    job = tmp_path / "bag.toml"
    job.write_text(JOB)
    out = tmp_path / "run"
    assert main(["run", str(job), "--set", "model.bag_width=6", "--out", str(out)]) == 0     # preflight included
    assert "model bag of 6-wide embeddings, " in capsys.readouterr().out
    assert "bag_width = 6" in (out / "config.toml").read_text()
    assert main(["run", str(job), "--set", "model.bag_width=100000000", "--out", str(tmp_path / "big")]) == 2
    assert "[model] bag_width = 100000000, layers = 2" in capsys.readouterr().err


def test_an_unregistered_family_is_refused_by_the_kind_choice(bag_lm):
    unregister_family("bag_lm")
    try:
        with pytest.raises(JobSpecError, match=r'\[model\] kind = "bag_lm": expected one of "lstm_lm", '
                                               r'"transformer_lm"'):
            loads_job(JOB)
        with pytest.raises(JobSpecError, match=r'\[model\] unknown key "bag_width"'):
            loads_job("", ["model.bag_width=3"])
    finally:
        register_family(BAG_LM)                   # for the fixture to take away


def test_an_unknown_kind_past_the_job_is_one_line_naming_the_known_ones():
    with pytest.raises(JobSpecError) as error:
        family_of("mlp")
    assert str(error.value) == ('[model] kind = "mlp": no model family of that name (known: "lstm_lm", '
                                '"transformer_lm")')


def test_a_family_cannot_take_a_key_of_another_or_a_kind_twice(bag_lm):
    with pytest.raises(ValueError, match="registered already"):
        register_family(BAG_LM)
    with pytest.raises(ValueError, match="the \\[model\\] keys hidden, layers belong to another family"):
        register_family(ModelFamily("clash_lm", (ModelKey("hidden", Int(gt=0), 1, "1", ""),
                                                 ModelKey("layers", Int(gt=0), 1, "1", "")),
                                    _build, str, str, str, str))
    with pytest.raises(JobSpecError, match="no model family"):
        family_of("clash_lm")
