"""Pipeline blocks and stages: the chain of blocks computes exactly what the model computes."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.autograd.ops import cross_entropy
from disttrain.models.lstm_lm import LSTMLanguageModel
from disttrain.models.protocol import block_states, detach_tensors, state_from_blocks
from disttrain.parallel.pipeline.blocks import Block, ModuleBlock, Stage, blocks_of

VOCAB, STEPS, BATCH = 23, 5, 3


def lstm_lm(layers=2, dropout=0.3, dtype="float64", embed=6, **kw):
    dt.manual_seed(0)
    return LSTMLanguageModel(VOCAB, hidden=8, layers=layers, embed=embed, dropout=dropout, **kw).to(dtype=dtype)


def mlp(dtype="float64"):
    dt.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 4)).to(dtype=dtype)


def tokens(seed=1):
    dt.manual_seed(seed)
    return dt.randint(0, VOCAB, (STEPS, BATCH)), dt.randint(0, VOCAB, (STEPS * BATCH,))


def grads(module):
    return {name: p.grad.numpy().copy() for name, p in module.named_parameters()}


def run_lm(fn, model, seed=7):
    """Loss, logits, final state and gradients of fn(tokens) with the dropout RNG at `seed`."""
    x, target = tokens()
    model.zero_grad()
    dt.manual_seed(seed)
    logits, state = fn(x)
    loss = cross_entropy(logits, target)
    loss.backward()
    return logits.numpy(), [s.numpy() for s in state], grads(model)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lstm_lm_blocks_compose_to_the_model_bit_for_bit(layers, dtype):
    model = lstm_lm(layers, dtype=dtype)
    blocks = blocks_of(model)
    stage = Stage(blocks)

    def through_stage(x):
        y, states = stage(x)
        return y, state_from_blocks(model, blocks, states)

    want = run_lm(model, model)
    got = run_lm(through_stage, model)
    np.testing.assert_array_equal(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        np.testing.assert_array_equal(g, w)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        np.testing.assert_array_equal(got[2][name], want[2][name], err_msg=name)


def test_lstm_lm_stages_in_a_row_with_a_carried_state_and_recurrent_checkpointing():
    model = lstm_lm(3)
    model.lstm.checkpoint_segments = 2
    blocks = blocks_of(model)
    first, second = Stage(blocks[:2]), Stage(blocks[2:])
    dt.manual_seed(3)
    state = (dt.randn(3, BATCH, 8, dtype="float64"), dt.randn(3, BATCH, 8, dtype="float64"))

    def through_stages(x):
        parts = block_states(model, blocks, state)
        y, s1 = first(x, parts[:2])
        y, s2 = second(y, parts[2:])
        return y, state_from_blocks(model, blocks, s1 + s2)

    want = run_lm(lambda x: model(x, state), model)
    got = run_lm(through_stages, model)
    for g, w in zip([got[0]] + got[1], [want[0]] + want[1]):
        np.testing.assert_array_equal(g, w)
    for name in want[2]:
        np.testing.assert_array_equal(got[2][name], want[2][name], err_msg=name)


def cnn(dtype="float64"):
    dt.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).to(dtype=dtype)


@pytest.mark.parametrize("build, input_shape", [(mlp, (4, 5)), (cnn, (2, 1, 8, 8))])
def test_sequential_blocks_compose_to_the_model_bit_for_bit(build, input_shape):
    model = build()
    dt.manual_seed(2)
    x = dt.randn(*input_shape, dtype="float64")
    blocks = blocks_of(model)
    assert [name for name, _ in blocks] == ["0", "1", "2", "3", "4"]
    assert all(isinstance(b, ModuleBlock) for _, b in blocks)
    model(x).sum().backward()
    want, want_y = grads(model), model(x).numpy()
    model.zero_grad()
    y, states = Stage(blocks[3:])(Stage(blocks[:3])(x)[0])
    y.sum().backward()
    assert states == [None, None]
    np.testing.assert_array_equal(y.numpy(), want_y)
    for name, g in grads(model).items():
        np.testing.assert_array_equal(g, want[name], err_msg=name)


def test_stages_use_the_models_names_and_parameter_objects():
    model = lstm_lm(3)
    blocks = blocks_of(model)
    assert [name for name, _ in blocks] == ["embedding", "lstm.l0", "lstm.l1", "lstm.l2", "decoder"]
    stages = [Stage(blocks[:2]), Stage(blocks[2:4]), Stage(blocks[4:])]
    assert list(stages[1].state_dict()) == [f"lstm.{w}_l{k}" for k in (1, 2)
                                           for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    merged = [key for s in stages for key in s.state_dict()]
    assert merged == list(model.state_dict())  # the stages' state_dicts merge into the model's, in order
    full = dict(model.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            assert p is full[name]  # shared, not copied
    assert sum(1 for s in stages for _ in s.parameters()) == len(full)


def test_stage_load_state_dict_writes_the_models_parameters():
    model = mlp()
    stage = Stage(blocks_of(model)[2:])
    new = {k: np.full(v.shape, 0.5) for k, v in stage.state_dict().items()}
    assert set(new) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    stage.load_state_dict(new)
    np.testing.assert_array_equal(model[2].weight.numpy(), 0.5)
    with pytest.raises(RuntimeError, match="missing key"):
        stage.load_state_dict({"2.weight": new["2.weight"]})


def test_tied_weights_are_kept_under_both_names_and_yielded_once():
    model = lstm_lm(2, tie_weights=True, embed=8)
    stage = Stage(blocks_of(model))
    assert "embedding.weight" in stage.state_dict() and "decoder.weight" in stage.state_dict()
    assert len(list(stage.parameters())) == len(list(model.parameters()))


def test_train_and_eval_reach_the_blocks_and_model_modules():
    model = lstm_lm(2)
    model.eval()
    blocks = blocks_of(model)
    assert not any(b.training for _, b in blocks)  # blocks start in the model's mode
    stage = Stage(blocks)
    stage.train()
    assert all(b.training for _, b in blocks) and model.embedding.training
    stage.eval()
    assert not any(b.training for _, b in blocks) and not model.decoder.training
    x, _ = tokens()
    np.testing.assert_array_equal(stage(x)[0].numpy(), model(x)[0].numpy())  # no dropout in eval


def test_lstm_layer_block_checks_its_state_and_starts_from_zeros():
    model = lstm_lm(2).eval()  # no dropout after layer 0: both runs must match
    block = blocks_of(model)[1][1]
    assert type(block).__name__ == "_LSTMLayerBlock" and block.layer == 0
    x = dt.randn(STEPS, BATCH, 6, dtype="float64")
    zero = dt.zeros(BATCH, 8, dtype="float64")
    np.testing.assert_array_equal(block(x)[0].numpy(), block(x, (zero, zero))[0].numpy())
    with pytest.raises(ValueError, match=r"state c has shape \(2, 8\), expected \(3, 8\)"):
        block(x, (zero, dt.zeros(2, 8, dtype="float64")))


def test_state_helpers():
    model = lstm_lm(2)
    blocks = blocks_of(model)
    h = dt.randn(2, BATCH, 8, dtype="float64", requires_grad=True)
    parts = block_states(model, blocks, (h, h * 2))
    assert parts[0] is None and parts[-1] is None
    np.testing.assert_array_equal(parts[2][1].numpy(), (h * 2).numpy()[1])
    merged = state_from_blocks(model, blocks, parts)
    np.testing.assert_array_equal(merged[0].numpy(), h.numpy())
    detached = detach_tensors(parts)
    assert detached[0] is None and not detached[1][0].requires_grad and isinstance(detached, list)
    with pytest.raises(ValueError, match=r"no state for layers \[0\]"):
        state_from_blocks(model, blocks[2:], parts[2:])
    with pytest.raises(TypeError, match="defines no block_states"):
        block_states(mlp(), blocks_of(mlp()), (h, h))
    assert block_states(model, blocks, None) == [None] * 4


class TwoHalves(nn.Module):
    """A model that says how it is cut."""

    def __init__(self, cover_all=True):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.cover_all = cover_all

    def forward(self, x):
        return self.b(self.a(x))

    def pipeline_blocks(self):
        blocks = [("a", ModuleBlock("a", self.a))]
        return blocks + [("b", ModuleBlock("b", self.b))] if self.cover_all else blocks


def test_pipeline_blocks_method_and_unsupported_models():
    model = TwoHalves()
    blocks = blocks_of(model)
    assert [n for n, _ in blocks] == ["a", "b"] and isinstance(blocks[0][1], Block)
    assert list(Stage(blocks).state_dict()) == list(model.state_dict())
    with pytest.raises(ValueError, match=r"parameters in no block: \['b.weight', 'b.bias'\]"):
        blocks_of(TwoHalves(cover_all=False))
    with pytest.raises(TypeError, match="cannot cut a Linear.*supported are nn.Sequential and models that define pipeline_blocks"):
        blocks_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no blocks"):
        blocks_of(nn.Sequential())
    with pytest.raises(ValueError, match="got 1 states for 2 blocks"):
        Stage(blocks)(dt.randn(1, 3), [None])


def test_a_stage_inside_another_module_gets_its_prefix():
    model = mlp()
    holder = nn.Module()
    holder.stage = Stage(blocks_of(model)[2:])
    assert list(holder.state_dict()) == ["stage.2.weight", "stage.2.bias", "stage.4.weight", "stage.4.bias"]
    assert [n for n, _ in holder.named_parameters()] == list(holder.state_dict())
    holder.eval()
    assert not model[4].training and model[0].training  # only the stage's blocks are switched
