"""JobSpec -> corpus, model, optimizer and LR schedules."""
import pytest

from disttrain import optim
from disttrain.train.build import (build_corpus, build_model, build_optimizer, build_schedules, is_char_level)
from disttrain.train.jobspec import JobSpecError, loads_job


def test_corpora(tiny_job, text_file):
    spec = tiny_job()
    corpus = build_corpus(spec)
    assert corpus.train.size + corpus.valid.size + corpus.test.size == len(text_file.read_text())
    assert is_char_level(spec)
    small = build_corpus(loads_job('[data]\nkind = "default_corpus"\nmax_bytes = 3000\n'))
    assert small.train.size + small.valid.size + small.test.size <= 3000
    with pytest.raises(JobSpecError, match=r'\[data\] path = "nowhere/ptb" .* does not exist'):
        build_corpus(tiny_job('data.kind="ptb"', 'data.path="nowhere/ptb"'))
    assert not is_char_level(tiny_job('data.kind="ptb"', 'data.path="nowhere/ptb"'))


def test_model_from_spec(tiny_job):
    model = build_model(tiny_job("model.embed=8", "model.init_scale=0.05", layers=2, dropout=0.25), 30)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    assert shapes["embedding.weight"] == (30, 8) and shapes["lstm.weight_ih_l0"] == (64, 8)
    assert shapes["lstm.weight_hh_l1"] == (64, 16) and shapes["decoder.weight"] == (30, 16)
    assert max(abs(p.numpy()).max() for p in model.parameters()) <= 0.05
    assert model.lstm.dropout == 0.25 and model.lstm.checkpoint_segments is None
    assert build_model(tiny_job('memory.activation_checkpointing="sqrt"'), 30).lstm.checkpoint_segments == "sqrt"
    assert build_model(tiny_job("memory.activation_checkpointing=4"), 30).lstm.checkpoint_segments == 4
    with pytest.raises(JobSpecError, match=r'\[model\] kind = "mlp": expected one of "lstm_lm", "transformer_lm"'):
        build_model(tiny_job('model.kind="mlp"'), 30)


@pytest.mark.parametrize("kind, cls", [("sgd", optim.SGD), ("adam", optim.Adam), ("adamw", optim.AdamW)])
def test_optimizers(tiny_job, kind, cls):
    spec = tiny_job("optim.weight_decay=0.01", "optim.momentum=0.9", optim=kind, lr=0.3)
    opt = build_optimizer(spec, build_model(spec, 10).parameters())
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.01
    if kind == "sgd":
        assert group["momentum"] == 0.9


def test_schedules(tiny_job):
    spec = tiny_job(optim="sgd", lr=1.0)
    opt = build_optimizer(spec, build_model(spec, 10).parameters())
    none = build_schedules(spec, opt)
    assert none.epoch is None and none.step is None
    spec = tiny_job("optim.decay_after_epoch=2", "optim.decay=0.5", "optim.warmup_steps=2", optim="sgd", lr=1.0)
    opt = build_optimizer(spec, build_model(spec, 10).parameters())
    both = build_schedules(spec, opt)
    assert isinstance(both.epoch, optim.EpochDecayLR) and isinstance(both.step, optim.LinearWarmup)
    lrs = [opt.param_groups[0]["lr"]]
    both.step.step()
    lrs.append(opt.param_groups[0]["lr"])
    both.step.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.5, 1.0, 1.0])
    for _ in range(3):
        both.epoch.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[3:] == pytest.approx([1.0, 0.5, 0.25])        # epochs 2, 3, 4 (decay after epoch 2)
    state = both.state_dict()
    assert state["epoch"]["last_epoch"] == 3


def test_transformer_model_from_spec(tiny_job):
    spec = tiny_job('model.kind="transformer_lm"', "model.d_model=16", "model.heads=2", "model.max_len=32",
                    'memory.activation_checkpointing="sqrt"', layers=3, dropout=0.1)
    assert (spec.model.d_ff, spec.model.max_len) == (64, 32)
    model = build_model(spec, 30)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    assert shapes["embedding.weight"] == (30, 16) and shapes["position.weight"] == (32, 16)
    assert shapes["blocks.2.attn.in_proj.weight"] == (48, 16) and shapes["blocks.2.mlp.fc1.weight"] == (64, 16)
    assert model.blocks[0].attn.heads == 2 and model.dropout == 0.1 and model.checkpoint_segments == "sqrt"
    defaults = tiny_job('model.kind="transformer_lm"').model
    assert (defaults.d_model, defaults.heads, defaults.d_ff, defaults.max_len) == (128, 4, 512, 256)
    assert tiny_job().model.d_model is None  # the transformer's keys stay unset for other families
    with pytest.raises(JobSpecError, match=r"\[model\] d_model = 16 is not a multiple of \[model\] heads = 3"):
        build_model(tiny_job('model.kind="transformer_lm"', "model.d_model=16", "model.heads=3"), 30)
    with pytest.raises(JobSpecError, match=r"\[data\] bptt = \d+ is longer than \[model\] max_len = 4"):
        build_model(tiny_job('model.kind="transformer_lm"', "model.max_len=4"), 30)
