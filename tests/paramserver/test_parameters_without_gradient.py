"""A push names the parameters it holds no gradient for (`no_grad`); the servers leave those alone, as a local
optimizer skips a parameter whose .grad is None: no momentum, no weight decay, no optimizer state. In sync mode a
parameter only some workers sent a gradient for is averaged as data mode averages it (the others count as zeros,
the sum is divided by every worker of the round)."""
import numpy as np
import pytest

import disttrain as dt

from ps_testing import layout_of, make_mlp, running_servers, sgd_factory, worker_clients

STEPS = 4


def gradients(model, seed):
    """Seeded float64 gradients, one flat array per parameter of `model`."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.numel()) for p in model.parameters()]


def set_grads(model, flat):
    """Install flat gradients (None: the parameter has none) as the parameters' .grad."""
    for p, g in zip(model.parameters(), flat):
        p.grad = None if g is None else dt.tensor(g.reshape(p.shape))


def test_async_push_leaves_a_parameter_without_gradient_and_its_momentum_alone():
    make = sgd_factory(lr=0.1, momentum=0.9, weight_decay=0.1)
    local, remote = make_mlp(), make_mlp()
    local_opt, _ = make(list(local.parameters()))
    layout = layout_of(remote, 2)
    initial = [p.numpy().copy() for p in remote.parameters()]
    with running_servers(layout, initial, make, {"consistency": "async"}) as (servers, endpoints), \
            worker_clients(endpoints, layout, (remote,)) as (client,):
        for step in range(STEPS):
            grads = gradients(remote, step)
            grads[1] = None                           # 0.bias: frozen
            if step % 2:
                grads[3] = None                       # 2.bias: unused every other step
            set_grads(local, grads)
            local_opt.step()
            client.push(grads, pull=True)
    for a, b in zip(local.parameters(), remote.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(remote[0].bias.numpy(), initial[1])
    for server in servers:                                # no momentum buffer for the frozen bias
        for key in server.keys:
            assert layout.parts[key].param != 1 or not server.optimizer.state.get(server.shards[key])


@pytest.mark.parametrize("servers", [1, 2])
def test_sync_averages_a_gradient_some_workers_sent_over_every_worker_as_data_mode_does(servers):
    make = sgd_factory(lr=0.1, momentum=0.9, weight_decay=0.1)
    local, w0, w1 = make_mlp(), make_mlp(), make_mlp()
    local_opt, _ = make(list(local.parameters()))
    layout = layout_of(w0, servers)
    initial = [p.numpy().copy() for p in w0.parameters()]
    with running_servers(layout, initial, make, {"consistency": "sync"}) as (_, endpoints), \
            worker_clients(endpoints, layout, (w0, w1)) as clients:
        for step in range(STEPS):
            g0, g1 = gradients(w0, 2 * step), gradients(w1, 2 * step + 1)
            g0[1] = g1[1] = None                      # 0.bias: no worker has a gradient
            g1[3] = None                              # 2.bias: only worker 0 has one
            set_grads(local, [None if a is None else (a + b) / 2 if b is not None else a / 2
                              for a, b in zip(g0, g1)])
            local_opt.step()
            handles = [c.push_async(g, pull=True) for c, g in zip(clients, (g0, g1))]
            for c, h in zip(clients, handles):
                c.wait(h)
    for a, b, c in zip(local.parameters(), w0.parameters(), w1.parameters()):
        np.testing.assert_array_equal(b.numpy(), c.numpy())
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(w0[0].bias.numpy(), initial[1])

