import copy
from collections import OrderedDict

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.nn.utils import preserved_buffers


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.scale = nn.Parameter(dt.ones(4))
        self.register_buffer("count", dt.zeros(1))
        self.register_buffer("scratch", dt.zeros(2), persistent=False)

    def forward(self, x):
        return self.fc(x) * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Block()
        self.act = nn.Tanh()
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 2)])
        self.heads[1].weight = self.heads[0].weight  # tied

    def forward(self, x):
        h = self.act(self.first(x))
        return self.heads[0](h) + self.heads[1](h)


def test_named_parameters_order_names_and_dedup():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["first.scale", "first.fc.weight", "first.fc.bias", "heads.0.weight", "heads.0.bias",
                     "heads.1.bias"]
    assert len(list(net.parameters())) == 6
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())


def test_state_dict_keys_order_and_detached_values():
    net = Net()
    sd = net.state_dict()
    assert isinstance(sd, OrderedDict)
    assert list(sd) == ["first.scale", "first.count", "first.fc.weight", "first.fc.bias",
                        "heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias"]
    assert all(type(v) is dt.Tensor and not v.requires_grad for v in sd.values())
    assert sd["first.fc.weight"].data is net.first.fc.weight.data  # shares memory, like torch


def test_modules_children_buffers():
    net = Net()
    assert [n for n, _ in net.named_modules()] == ["", "first", "first.fc", "act", "heads", "heads.0", "heads.1"]
    assert [type(c).__name__ for c in net.children()] == ["Block", "Tanh", "ModuleList"]
    assert [n for n, _ in net.named_buffers()] == ["first.count", "first.scratch"]
    assert len(list(net.buffers())) == 2


def test_state_dict_round_trip_keeps_parameter_identity():
    dt.manual_seed(0)
    src = Net()
    dt.manual_seed(1)
    dst = Net()
    params_before = list(dst.parameters())
    result = dst.load_state_dict(src.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(a is b for a, b in zip(params_before, dst.parameters()))
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
    x = dt.randn(5, 3)
    np.testing.assert_array_equal(src(x).numpy(), dst(x).numpy())


def test_load_state_dict_accepts_numpy_arrays_and_copies():
    net = Block()
    sd = {k: np.full(v.shape, 0.5, dtype=np.float32) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    sd["fc.weight"][...] = 7.0
    np.testing.assert_array_equal(net.fc.weight.numpy(), np.full((4, 3), 0.5, np.float32))


def test_load_state_dict_strict_errors_list_missing_and_unexpected():
    net = Block()
    sd = net.state_dict()
    del sd["fc.bias"]
    sd["fc.extra"] = dt.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing key\(s\): 'fc.bias'(.|\n)*unexpected key\(s\): 'fc.extra'"):
        net.load_state_dict(sd)
    result = net.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["fc.bias"] and result.unexpected_keys == ["fc.extra"]


def test_load_state_dict_shape_mismatch_names_key_and_shapes_and_copies_nothing():
    net = Block()
    before = net.scale.numpy().copy()
    sd = {k: v.numpy() * 0 for k, v in net.state_dict().items()}
    sd["fc.weight"] = np.zeros((3, 4), np.float32)
    with pytest.raises(RuntimeError, match=r"fc\.weight.*\(3, 4\).*\(4, 3\)"):
        net.load_state_dict(sd, strict=False)
    np.testing.assert_array_equal(net.scale.numpy(), before)


def test_train_eval_flags_recursively():
    net = Net()
    assert net.training and net.first.fc.training
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_and_requires_grad_():
    net = Net()
    net(dt.randn(2, 3)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=False)
    assert all(np.all(p.grad.numpy() == 0) for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    net.requires_grad_(False)
    assert not any(p.requires_grad for p in net.parameters())


def test_tied_weight_gets_both_gradients():
    net = Net()
    x = dt.randn(5, 3)
    net(x).sum().backward()
    with dt.no_grad():
        h = net.act(net.first(x)).numpy()
    expected = 2 * np.ones((5, 2), np.float32).T @ h  # both heads use W: d(sum)/dW = 2 * 1^T h
    np.testing.assert_allclose(net.heads[0].weight.grad.numpy(), expected, rtol=1e-5)


def test_to_dtype_keeps_parameters_and_casts_buffers():
    net = Block()
    params = list(net.parameters())
    net.double()
    assert all(a is b for a, b in zip(params, net.parameters()))
    assert all(p.dtype == dt.float64 for p in net.parameters())
    assert net.count.dtype == dt.float64
    assert net(dt.randn(2, 3, dtype="float64")).dtype == dt.float64
    assert net.to("cpu") is net


def test_setattr_rules():
    m = nn.Module()
    m.w = nn.Parameter(dt.ones(1))
    with pytest.raises(TypeError, match="Parameter or None"):
        m.w = dt.ones(1)
    m.w = None
    assert list(m.named_parameters()) == [] and list(m.state_dict()) == []
    m.sub = nn.ReLU()
    m.sub = nn.Parameter(dt.ones(2))  # re-registering under another kind moves it
    assert [n for n, _ in m.named_parameters()] == ["sub"] and list(m.children()) == []
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        m.missing

    class Early(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(dt.ones(1))

    with pytest.raises(AttributeError, match="super"):
        Early()


def test_apply_visits_children_then_self():
    net = Net()
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen[-1] == "Net" and seen.count("Linear") == 3


def test_repr_tree():
    text = repr(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Dropout(0.25))))
    assert text == ("Sequential(\n"
                    "  (0): Linear(in_features=2, out_features=3, bias=True)\n"
                    "  (1): Sequential(\n"
                    "    (0): ReLU()\n"
                    "    (1): Dropout(p=0.25)\n"
                    "  )\n"
                    ")")


def test_sequential_indexing_len_iter_append():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert len(seq) == 2 and isinstance(seq[-1], nn.ReLU)
    seq.append(nn.Linear(3, 1))
    assert [type(m).__name__ for m in seq] == ["Linear", "ReLU", "Linear"]
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and head[0] is seq[0]
    assert seq(dt.randn(4, 2)).shape == (4, 1)
    with pytest.raises(IndexError):
        seq[3]
    del seq[1]
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_sequential_from_ordered_dict_uses_names():
    seq = nn.Sequential(OrderedDict(fc=nn.Linear(2, 2), act=nn.Tanh()))
    assert list(seq.state_dict()) == ["fc.weight", "fc.bias"]
    assert isinstance(seq[1], nn.Tanh)


def test_module_list_registers_and_inserts():
    ml = nn.ModuleList()
    ml.append(nn.Linear(1, 1)).extend([nn.Linear(1, 2)])
    ml.insert(0, nn.Linear(2, 1))
    assert [m.out_features for m in ml] == [1, 1, 2]
    assert [n for n, _ in ml.named_parameters()][:2] == ["0.weight", "0.bias"]


def test_deepcopy_gives_independent_module_with_ties_kept():
    net = Net()
    twin = copy.deepcopy(net)
    assert twin.heads[1].weight is twin.heads[0].weight
    assert twin.first.fc.weight is not net.first.fc.weight
    with dt.no_grad():
        twin.first.fc.weight.fill_(0.0)
    assert np.any(net.first.fc.weight.numpy() != 0)


def test_preserved_buffers_puts_back_every_buffer_and_its_values():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", dt.zeros(3))
            self.register_buffer("seen", dt.zeros(1), persistent=False)

        def forward(self, x):
            self.mean.data[...] += x.data.mean(axis=0)     # in place, as running statistics are kept
            self.seen = self.seen + 1                        # rebinds the attribute to a new tensor
            return x

    model = nn.Sequential(Counting(), nn.Linear(3, 2))
    mean, seen = model[0].mean, model[0].seen
    with preserved_buffers(model):
        model(dt.ones(4, 3))
        assert model[0].mean.numpy().tolist() == [1.0, 1.0, 1.0] and model[0].seen is not seen
    assert model[0].mean is mean and model[0].seen is seen
    assert mean.numpy().tolist() == [0.0, 0.0, 0.0] and seen.numpy().tolist() == [0.0]
