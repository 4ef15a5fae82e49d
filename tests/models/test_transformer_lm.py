"""The Transformer LM: a block and the whole model against PyTorch's modules (float64, same weights), its
pipeline blocks, per-block activation checkpointing, errors, and a short training run."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import optim
from disttrain.autograd.ops import cross_entropy
from disttrain.checkpointing import MemoryMeter, apply_activation_checkpointing
from disttrain.models.transformer_lm import TransformerBlock, TransformerLanguageModel
from disttrain.parallel.pipeline.blocks import Stage, blocks_of

VOCAB, STEPS, BATCH, WIDTH, HEADS = 19, 6, 3, 16, 4


def model_of(layers=2, dropout=0.0, dtype="float64", **kw):
    dt.manual_seed(0)
    return TransformerLanguageModel(VOCAB, d_model=WIDTH, heads=HEADS, layers=layers, d_ff=24, max_len=8,
                                    dropout=dropout, **kw).to(dtype=dtype)


def windows(seed=1):
    rng = np.random.default_rng(seed)
    return dt.tensor(rng.integers(0, VOCAB, (STEPS, BATCH))), dt.tensor(rng.integers(0, VOCAB, (STEPS, BATCH)))


def grads(model):
    return {name: p.grad.numpy().copy() for name, p in model.named_parameters()}


def step(model, run=None, seed=7):
    """(loss, logits, gradients) of one forward_loss-style step, the dropout generator at `seed`."""
    x, y = windows()
    model.zero_grad()
    dt.manual_seed(seed)
    logits, state = (run or model)(x)
    assert state is None
    loss = cross_entropy(logits, y.reshape((-1,)))
    loss.backward()
    return loss.item(), logits.numpy(), grads(model)


def assert_same_step(got, want, exact=True):
    compare = np.testing.assert_array_equal if exact else (
        lambda a, b, err_msg="": np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=err_msg))
    compare(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        compare(got[2][name], want[2][name], err_msg=name)


# ---- against PyTorch -----------------------------------------------------------------------------------
def torch_block(torch, ours):
    """torch.nn.TransformerEncoderLayer (pre-LN, tanh GELU, (T, B, D)) holding a copy of `ours`' weights."""
    F = torch.nn.functional
    layer = torch.nn.TransformerEncoderLayer(WIDTH, HEADS, dim_feedforward=24, dropout=0.0,
                                             activation=lambda x: F.gelu(x, approximate="tanh"),
                                             norm_first=True, dtype=torch.float64)
    pairs = {"self_attn.in_proj_weight": "attn.in_proj.weight", "self_attn.in_proj_bias": "attn.in_proj.bias",
             "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
             "linear1.weight": "mlp.fc1.weight", "linear1.bias": "mlp.fc1.bias", "linear2.weight": "mlp.fc2.weight",
             "linear2.bias": "mlp.fc2.bias", "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
             "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for theirs_name, p in layer.named_parameters():
            p.copy_(torch.from_numpy(ours_params[pairs[theirs_name]].numpy()))
    return layer, pairs


def causal_mask(torch, steps):
    return torch.nn.Transformer.generate_square_subsequent_mask(steps, dtype=torch.float64)


def test_a_block_equals_torch_transformer_encoder_layer_with_a_causal_mask():
    torch = pytest.importorskip("torch")
    dt.manual_seed(0)
    ours = TransformerBlock(WIDTH, HEADS, 24).to(dtype="float64")
    for p in ours.parameters():  # LayerNorm ones and zero biases would hide mistakes in their gradients
        p.data[...] = np.random.default_rng(p.data.size).uniform(-0.5, 0.5, p.shape) + (p.ndim == 1) * 0.5
    theirs, pairs = torch_block(torch, ours)
    x_np = np.random.default_rng(5).standard_normal((STEPS, BATCH, WIDTH))
    seed = np.random.default_rng(6).standard_normal((STEPS, BATCH, WIDTH))
    x = dt.tensor(x_np, requires_grad=True)
    out = ours(x)
    (out * dt.tensor(seed)).sum().backward()
    tx = torch.tensor(x_np, requires_grad=True)
    tout = theirs(tx, src_mask=causal_mask(torch, STEPS), is_causal=True)
    (tout * torch.from_numpy(seed)).sum().backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    ours_params = dict(ours.named_parameters())
    for theirs_name, p in theirs.named_parameters():
        np.testing.assert_allclose(ours_params[pairs[theirs_name]].grad.numpy(), p.grad.numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=pairs[theirs_name])


@pytest.mark.parametrize("tie_weights", [False, True])
def test_the_whole_model_equals_a_torch_model_built_from_its_modules(tie_weights):
    torch = pytest.importorskip("torch")
    model = model_of(tie_weights=tie_weights)
    loss, logits, ours = step(model)
    layers, names = zip(*[torch_block(torch, block) for block in model.blocks])
    emb, pos = (torch.tensor(m.weight.numpy(), requires_grad=True) for m in (model.embedding, model.position))
    norm = torch.nn.LayerNorm(WIDTH, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(model.norm.weight.numpy()))
        norm.bias.copy_(torch.from_numpy(model.norm.bias.numpy()))
    dec_w = emb if tie_weights else torch.tensor(model.decoder.weight.numpy(), requires_grad=True)
    dec_b = torch.tensor(model.decoder.bias.numpy(), requires_grad=True)
    x, y = windows()
    h = emb[torch.from_numpy(x.numpy())] + pos[:STEPS, None, :]
    for layer in layers:
        h = layer(h, src_mask=causal_mask(torch, STEPS), is_causal=True)
    tlogits = torch.nn.functional.linear(norm(h).reshape(STEPS * BATCH, WIDTH), dec_w, dec_b)
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(y.numpy().reshape(-1)))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-10, atol=1e-12)
    theirs = {"embedding.weight": emb.grad, "position.weight": pos.grad, "norm.weight": norm.weight.grad,
              "norm.bias": norm.bias.grad, "decoder.bias": dec_b.grad}
    if not tie_weights:
        theirs["decoder.weight"] = dec_w.grad
    for i, (layer, pairs) in enumerate(zip(layers, names)):
        for theirs_name, p in layer.named_parameters():
            theirs[f"blocks.{i}.{pairs[theirs_name]}"] = p.grad
    assert set(theirs) == set(ours)
    for name, g in theirs.items():
        np.testing.assert_allclose(ours[name], g.numpy(), rtol=1e-9, atol=1e-13, err_msg=name)


# ---- the calling convention ------------------------------------------------------------------------------
def test_forward_loss_is_forward_plus_cross_entropy_and_state_stays_none():
    model = model_of(dropout=0.0)
    x, y = windows()
    loss, state = model.forward_loss(x, y)
    logits, _ = model(x)
    assert state is None and logits.shape == (STEPS * BATCH, VOCAB)
    assert loss.item() == cross_entropy(logits, y.reshape((-1,))).item()
    later, _ = model(x[:3])  # causal: a prefix's logits do not depend on what follows it
    np.testing.assert_allclose(later.numpy(), logits.numpy()[:3 * BATCH], rtol=1e-12, atol=1e-14)


def test_bad_inputs_and_settings_are_refused():
    model = model_of()
    x, y = windows()
    with pytest.raises(ValueError, match="state must be None"):
        model(x, (x, x))
    with pytest.raises(ValueError, match="longer than max_len = 8"):
        model(dt.zeros(9, 2, dtype="int64"))
    with pytest.raises(ValueError, match=r"tokens must be \(T, B\)"):
        model(dt.zeros(9, dtype="int64"))
    with pytest.raises(ValueError, match="same shape"):
        model.forward_loss(x, y[:2])
    with pytest.raises(ValueError, match="not a multiple of heads"):
        TransformerLanguageModel(VOCAB, d_model=10, heads=4)
    with pytest.raises(ValueError, match="segments"):
        model.checkpoint_segments = 0


# ---- pipeline blocks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pipeline_blocks_compose_to_the_model_bit_for_bit(dtype):
    model = model_of(layers=3, dropout=0.2, dtype=dtype)
    blocks = blocks_of(model)
    assert [name for name, _ in blocks] == ["embedding", "blocks.0", "blocks.1", "blocks.2", "decoder"]
    names = [n for _, b in blocks for n in b.state_dict()]
    assert sorted(names) == sorted(model.state_dict()) and len(names) == len(set(names))
    first, second = Stage(blocks[:2]), Stage(blocks[2:])

    def through_stages(x):
        y, _ = first(x)
        y, _ = second(y)
        return y, None

    assert_same_step(step(model, through_stages), step(model))
    model.eval()  # eval mode reaches the blocks' modules: no dropout anywhere
    with dt.no_grad():
        np.testing.assert_array_equal(Stage(blocks_of(model))(windows()[0])[0].numpy(),
                                      model(windows()[0])[0].numpy())


# ---- activation checkpointing ----------------------------------------------------------------------------
@pytest.mark.parametrize("segments, nodes", [("sqrt", 1), (2, 1), (4, 3), (100, 3)])
def test_checkpointed_blocks_give_the_plain_gradients_and_record_checkpoint_nodes(segments, nodes, checkpoint_nodes):
    model = model_of(layers=4, dropout=0.1)
    want = step(model)
    model.checkpoint_segments = segments
    got = step(model)
    assert_same_step(got, want)  # dropout masks replayed: the same numbers in the same order
    x, y = windows()
    loss, _ = model.forward_loss(x, y)
    assert checkpoint_nodes(loss) == nodes  # every segment but the last
    with dt.no_grad():
        assert model.forward_loss(x, y)[0].grad_fn is None
    model.checkpoint_segments = None
    assert checkpoint_nodes(model.forward_loss(x, y)[0]) == 0


def test_the_job_setting_reaches_the_model_and_checkpointing_keeps_less_memory():
    model = model_of(layers=6, dtype="float32")
    apply_activation_checkpointing(model, 6)
    assert model.checkpoint_segments == 6

    def peak(segments):
        model.checkpoint_segments = segments
        step(model)  # gradients exist before the metered step
        x, y = windows()
        with MemoryMeter() as meter:
            loss, _ = model.forward_loss(x, y)
            loss.backward()
            del loss
        return meter.peak_bytes - meter.start_bytes

    plain, per_block = peak(None), peak(6)
    assert per_block < 0.75 * plain, (plain, per_block)
    apply_activation_checkpointing(model, "none")
    assert model.checkpoint_segments is None


# ---- it learns -------------------------------------------------------------------------------------------
def test_a_short_local_training_loop_learns_generated_text(make_text):
    """A plain loop over (T, B) windows of a character corpus, as the Trainer will run it."""
    text = make_text(6000)
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = np.array([vocab[c] for c in text], dtype=np.int64)
    dt.manual_seed(0)
    model = TransformerLanguageModel(len(vocab), d_model=32, heads=2, layers=2, max_len=32, dropout=0.0)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(80):
        starts = rng.integers(0, len(ids) - 25, 8)
        window = np.stack([ids[s:s + 25] for s in starts], axis=1)  # (25, 8): time-major
        loss, _ = model.forward_loss(dt.tensor(window[:-1]), dt.tensor(window[1:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[:5]) > 0.9 * np.log(len(vocab))
    assert np.mean(losses[-10:]) < 0.6 * np.log(len(vocab)), losses[-10:]


def test_the_job_file_loads_and_builds_the_model():
    from pathlib import Path

    from disttrain.train.build import build_model
    from disttrain.train.jobspec import load_job

    spec = load_job(Path(__file__).resolve().parents[2] / "jobs" / "charlm_transformer.toml")
    model = build_model(spec, 96)
    assert isinstance(model, TransformerLanguageModel) and len(model.blocks) == spec.model.layers
    assert model.max_len >= spec.data.bptt and model.checkpoint_segments is None
