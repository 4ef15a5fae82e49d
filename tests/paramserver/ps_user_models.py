"""Users' own models that parameter-server mode must train as local mode does: parameters without a gradient
(frozen, or unused on some steps) and buffers (running statistics). Named by `[model] factory =
"ps_user_models:..."` with `[data] factory = "parallel.user_models:blobs"` (2 inputs, 3 classes): user_job."""
import disttrain as dt
from disttrain import nn
from disttrain.nn import functional as F
from disttrain.train.jobspec import loads_job

from tiny_jobs import PARAMETER_SERVER

USER_JOB = """
[model]
factory = "ps_user_models:{model}"
[data]
factory = "parallel.user_models:blobs"
batch_size = 24
[optim]
kind = "adamw"
lr = 0.01
weight_decay = 0.1
[train]
epochs = 2
log_every = 10
checkpoint_every = 0
seed = 4
"""


def user_job(model, *overrides, source="<user job>"):
    """A parameter-server job (AdamW with weight decay, 40 steps) training `model`, a factory of this module."""
    return loads_job(USER_JOB.format(model=model), [*PARAMETER_SERVER, *overrides], source=source)


def frozen(job, data):
    """An MLP whose first layer is frozen (requires_grad=False): no optimizer may change it."""
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


class Branchy(nn.Module):
    """Training steps alternate between two branches, so each branch's parameters get no gradient every other
    step; evaluation uses the left one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 16)
        self.left = nn.Linear(16, 16)
        self.right = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)
        self.calls = 0

    def forward(self, x):
        h = F.relu(self.a(x))
        branch = self.left
        if self.training:
            self.calls += 1
            branch = self.left if self.calls % 2 else self.right
        return self.out(F.relu(branch(h)))


def branchy(job, data):
    return Branchy()


class RunningNorm(nn.Module):
    """Batch-norm-like: normalises with the batch's statistics in training, with running ones (persistent
    buffers) in evaluation."""

    def __init__(self, n, momentum=0.1):
        super().__init__()
        self.register_buffer("running_mean", dt.zeros(n))
        self.register_buffer("running_var", dt.ones(n))
        self.momentum = momentum

    def forward(self, x):
        if not self.training:
            return (x - self.running_mean) / (self.running_var + 1e-5) ** 0.5
        mean = x.mean(axis=0)
        var = ((x - mean) ** 2).mean(axis=0)
        with dt.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(mean.detach() * self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var.detach() * self.momentum)
        return (x - mean) / (var + 1e-5) ** 0.5


def buffered(job, data):
    return nn.Sequential(nn.Linear(2, 16), RunningNorm(16), nn.ReLU(), nn.Linear(16, 3))
