"""A user's own model and data, outside disttrain: what a job's `[model] factory` and `[data] factory` name
("user_models:classifier", "user_models:blobs") when this directory is on PYTHONPATH."""
import os

import numpy as np

from disttrain import nn
from disttrain.data.source import ArrayData
from disttrain.train.jobspec import JobSpecError


def blobs(job):
    """Three Gaussian blobs in the plane, labelled by blob: 480 training points, 120 each to validate and test."""
    rng = np.random.default_rng(job.train.seed)
    centres = np.array([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])

    def points(n):
        labels = rng.integers(0, 3, n)
        return centres[labels] + rng.standard_normal((n, 2)), labels

    return ArrayData(*points(480), job.data.batch_size, eval={"valid": points(120), "test": points(120)},
                     shuffle=True, seed=job.train.seed)


def classifier(job, data):
    """An MLP of [model] layers hidden layers of [model] hidden units, from the data's input width to its classes."""
    width, classes = data.inputs.shape[1], int(data.targets.max()) + 1
    layers, last = [], width
    for _ in range(job.model.layers):
        layers += [nn.Linear(last, job.model.hidden), nn.Tanh()]
        last = job.model.hidden
    return nn.Sequential(*layers, nn.Linear(last, classes))


def _fails_on_rank_1(make, error):
    """make(...), except on the launched rank 1, which raises `error`: a mistake one host makes and others do not."""
    def factory(*args):
        if os.environ.get("PMI_RANK") == "1":
            raise error
        return make(*args)

    return factory


blobs_crash_on_rank_1 = _fails_on_rank_1(blobs, RuntimeError("rank 1 cannot read its data"))
blobs_missing_on_rank_1 = _fails_on_rank_1(blobs, JobSpecError("[data] factory: no data on rank 1's host"))
classifier_crash_on_rank_1 = _fails_on_rank_1(classifier, RuntimeError("rank 1's model factory broke"))


def classifier_of_wrong_width(job, data):
    """A model whose first layer expects one input feature more than the data has: a user's shape mistake."""
    return nn.Sequential(nn.Linear(data.inputs.shape[1] + 1, job.model.hidden), nn.Tanh(), nn.Linear(job.model.hidden, 3))


class _TwoLayers(nn.Module):
    """Not an nn.Sequential and no pipeline_blocks(): pipeline mode cannot cut it."""

    def __init__(self, width, hidden, classes):
        super().__init__()
        self.a, self.b = nn.Linear(width, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.b(self.a(x).tanh())


def not_a_chain(job, data):
    return _TwoLayers(data.inputs.shape[1], job.model.hidden, 3)


class _Ends(nn.Module):
    """Two blocks sharing one Linear (a user's tied weights), cut by pipeline_blocks()."""

    def __init__(self, width, hidden, classes):
        super().__init__()
        shared = nn.Linear(width, width)
        self.first = nn.Sequential(shared, nn.Linear(width, hidden))
        self.last = nn.Sequential(nn.Linear(hidden, width), shared, nn.Linear(width, classes))

    def forward(self, x):
        return self.last(self.first(x))

    def pipeline_blocks(self):
        from disttrain.parallel.pipeline.blocks import ModuleBlock

        return [("first", ModuleBlock("first", self.first)), ("last", ModuleBlock("last", self.last))]


def tied_ends(job, data):
    return _Ends(data.inputs.shape[1], job.model.hidden, 3)


class Pair(nn.Module):
    """A block returning a tuple: (h, 2h)."""

    def forward(self, h):
        return h, h * 2.0


class Sum(nn.Module):
    """A block taking a pair: its sum."""

    def forward(self, pair):
        return pair[0] + pair[1]


def pair_in_the_middle(job, data):
    """A chain whose third block returns a tuple that the fourth takes: no stage may start at the fourth."""
    hidden = job.model.hidden
    return nn.Sequential(nn.Linear(data.inputs.shape[1], hidden), nn.Tanh(), Pair(), Sum(), nn.Linear(hidden, 3))


def classifier_then_tanh(job, data):
    """classifier() with a last activation: a block without parameters that a stage can be given alone."""
    return nn.Sequential(*classifier(job, data), nn.Tanh())
