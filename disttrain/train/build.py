"""From a JobSpec to the objects a training run needs: data, model, optimizer, LR schedules.

    spec = load_job("jobs/charlm.toml")
    data = build_data(spec)                           # a data source (disttrain.data.source)
    model = build_model(spec, data).to(spec.train.device)
    optimizer = build_optimizer(spec, model.parameters())
    schedules = build_schedules(spec, optimizer)      # Schedules(epoch=..., step=...), either may be None

A job brings its own model or data with `[model] factory` / `[data] factory = "package.module:function"`
(the module importable, e.g. on PYTHONPATH):

    model function(job, data) -> nn.Module     job: the JobSpec (its own settings in job.model.options,
                                               a table of any TOML values), data: the data source;
                                               the model follows disttrain.models.protocol
    data  function(job) -> data source         disttrain.data.source's contract (e.g. an ArrayData);
                                               its own settings in job.data.options

A factory replaces the family `kind` names; the run seeds the RNG with [train] seed before calling it.

Everything here is a pure function of the spec (plus the data files and the RNG seed), so a resumed job
rebuilds exactly the same objects before loading their saved state into them.
"""
import importlib
from dataclasses import dataclass
from pathlib import Path

from disttrain import optim
from disttrain.data import load_char_corpus, load_default_corpus, load_ptb
from disttrain.data.source import LanguageModelData
from disttrain.checkpointing import apply_activation_checkpointing
from disttrain.nn.module import Module
from disttrain.train.families import family_of
from disttrain.train.jobspec import JobSpecError, check_paths

__all__ = ["Schedules", "build_data", "build_corpus", "build_model", "apply_checkpointing_setting", "build_optimizer",
           "build_schedules", "is_char_level", "load_factory", "describe_model", "describe_data"]


def is_char_level(spec):
    """True for character-level corpora (their metrics add bits per character)."""
    return spec.data.kind in ("chars", "default_corpus")


def build_corpus(spec):
    """The job's Corpus: PTB words, a character text file, or the embedded default corpus.

    Raises JobSpecError (naming the file and key) when the data files are not there.
    """
    path = check_paths(spec)
    kind = spec.data.kind
    if kind == "ptb":
        return load_ptb(path)
    if kind == "chars":
        return load_char_corpus(Path(path))
    return load_default_corpus(spec.data.max_bytes)


def build_data(spec):
    """The job's data source: its [data] factory's, or the corpus cut for truncated BPTT."""
    if spec.data.factory is not None:
        data = load_factory(spec, "data")(spec)
        _check_data_source(spec, data)
        return data
    return LanguageModelData(build_corpus(spec), spec.data.batch_size, spec.data.bptt,
                             char_level=is_char_level(spec))


def load_factory(spec, section):
    """The function `[section] factory = "package.module:function"` names; JobSpecError when it cannot be
    imported or is not callable."""
    where = f'{spec.source or "<job>"}: [{section}] factory = "{spec[section].factory}"'
    module_name, _, attribute = spec[section].factory.partition(":")
    if not module_name or not attribute:
        raise JobSpecError(f'{where}: expected "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise JobSpecError(f"{where}: cannot import {module_name}: {exc} (is its directory on PYTHONPATH?)") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise JobSpecError(f"{where}: {module_name} has no function {attribute!r}")
    return function


def _check_data_source(spec, data):
    missing = [name for name in ("train_batches", "eval_batches", "eval_splits", "batch_axis", "sequential", "unit",
                                 "language") if not hasattr(data, name)]
    if missing:
        raise JobSpecError(f'{spec.source or "<job>"}: [data] factory = "{spec.data.factory}" returned a '
                           f"{type(data).__name__} without {', '.join(missing)} (disttrain.data.source's contract)")


def build_model(spec, data):
    """The job's model, freshly initialised from the current RNG state (seed first for reproducibility).
    data: the data source (a factory gets it; the language-model families read its vocab_size), or the
    vocabulary size.

    [memory] activation_checkpointing ("none", "sqrt" or a segment count) becomes the model's
    checkpoint_segments: the training step's forward_loss cuts each BPTT window into that many time segments
    (round(sqrt(bptt)) for "sqrt") and recomputes them in backward instead of storing their activations.
    "auto" is left to the Trainer (disttrain.train.auto_checkpointing), which measures a step first.
    """
    m = spec.model
    if m.factory is not None:
        model = load_factory(spec, "model")(spec, data)
        if not isinstance(model, Module):
            raise JobSpecError(f'{spec.source or "<job>"}: [model] factory = "{m.factory}" returned a '
                               f"{type(model).__name__}, not an nn.Module")
    else:
        vocab_size = data if isinstance(data, int) else data.vocab_size
        model = family_of(m.kind).build(spec, vocab_size)
    return apply_checkpointing_setting(spec, model)


def apply_checkpointing_setting(spec, model):
    """Set [memory] activation_checkpointing "sqrt" or a segment count on `model` (returned). "none" leaves the
    model as it is (a model of one's own may set its own checkpoint_segments); "auto" is the Trainer's
    (disttrain.train.auto_checkpointing), which measures a step first. JobSpecError for a model that cannot."""
    setting = spec.memory.activation_checkpointing
    if setting not in ("none", "auto"):
        try:
            apply_activation_checkpointing(model, setting)
        except ValueError as exc:
            raise JobSpecError(f'{spec.source or "<job>"}: [memory] activation_checkpointing = {setting!r}: '
                               f"{exc}") from None
    return model


def describe_model(spec):
    """The job's model in a few words, for the job log."""
    m = spec.model
    if m.factory is not None:
        return f"from {m.factory}"
    return family_of(m.kind).describe(m)


def describe_data(spec, data):
    """The job's data in a few words, for the job log."""
    what = f"data from {spec.data.factory}" if spec.data.factory is not None else f"{spec.data.kind} corpus"
    own = getattr(data, "describe", None)
    return f"{what}, {own()}" if own is not None else what


def build_optimizer(spec, params):
    """SGD (with momentum), Adam or AdamW with the job's lr and weight decay."""
    o = spec.optim
    params = list(params)
    if o.kind == "sgd":
        return optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.kind == "adam":
        return optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


@dataclass
class Schedules:
    """The LR schedules of a job: `epoch` is stepped after every epoch, `step` after every optimizer step.

    Both are chainable torch-style schedulers on the same optimizer, so their factors multiply.
    """
    epoch: object = None    # EpochDecayLR, or None when the lr never decays
    step: object = None     # LinearWarmup over warmup_steps, or None

    def state_dict(self):
        return {name: (s.state_dict() if s is not None else None) for name, s in (("epoch", self.epoch),
                                                                                  ("step", self.step))}

    def load_state_dict(self, state):
        for name in ("epoch", "step"):
            mine, saved = getattr(self, name), state.get(name)
            if (mine is None) != (saved is None):
                raise ValueError(f"the checkpoint {'has' if saved is not None else 'lacks'} a per-{name} LR "
                                 f"schedule and this job {'does not' if mine is None else 'does'}")
            if mine is not None:
                mine.load_state_dict(saved)


def build_schedules(spec, optimizer):
    """EpochDecayLR when decay_after_epoch > 0 and decay < 1; a linear warm-up when warmup_steps > 0.

    Warm-up: the lr of step s (1-based) is lr * s / warmup_steps for s <= warmup_steps, then lr.
    NOTE: construct these before loading an optimizer state: construction sets the lrs.
    """
    o = spec.optim
    epoch = step = None
    if o.decay_after_epoch > 0 and o.decay < 1:
        epoch = optim.EpochDecayLR(optimizer, decay_after_epoch=o.decay_after_epoch, decay=o.decay)
    if o.warmup_steps > 0:
        step = optim.LinearWarmup(optimizer, start_factor=1.0 / o.warmup_steps, end_factor=1.0,
                                  total_iters=max(o.warmup_steps - 1, 1))
    return Schedules(epoch=epoch, step=step)
