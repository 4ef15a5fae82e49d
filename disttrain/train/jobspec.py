"""Job specs: a declarative schema for TOML job files, a loader that validates them, and a TOML writer.

A job file holds up to six sections of scalar keys; a missing section or key takes its default:

    [model]    kind = "lstm_lm"   hidden = 200   layers = 2   dropout = 0.0   init_scale = 0.1
    [data]     kind = "ptb"       batch_size = 20   bptt = 20
    [optim]    kind = "sgd"       lr = 1.0   clip_norm = 5.0   decay_after_epoch = 4   decay = 0.5
    [train]    epochs = 13        eval_every = "epoch"   checkpoint_every = 500   keep_checkpoints = 2   seed = 0
    [memory]   activation_checkpointing = "none"
    [parallel] mode = "local"

    spec = load_job("jobs/ptb_small.toml", overrides=["optim.lr=0.5", "train.epochs=2"])
    spec.model.hidden          # 200
    spec.to_toml()             # the resolved job, every key written out; load_job reads it back unchanged

SCHEMA below is the single source of truth: one `Field` line per key (name, type, default, description); the
[model] keys of each family, and the `kind`s, come from the model families' records (train/families.py).
A default is a value, `None` (the key may stay unset), `REQUIRED`, or a `Derived` computed from the keys
declared before it in the same section (e.g. `model.embed` defaults to `model.hidden`).

NOTE: every error in a file (and in its overrides) is collected and raised together as one JobSpecError,
one problem per line, each naming the file, `[section] key`, the bad value and what was expected.

NOTE: `data.path` is kept as written; relative paths are resolved against the current working directory
(by `check_paths` and the data loaders), since jobs are run from the project root. For kind = "ptb" its
default is read from $DISTTRAIN_PTB when the job is loaded.
"""
import difflib
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable

from disttrain.data.ptb import PTB_ENV_VAR, PTB_FALLBACK, ptb_fallback

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["JobSpecError", "JobSpec", "Section", "Field", "SCHEMA", "REQUIRED", "Derived", "load_job",
           "loads_job", "check_paths", "describe_schema", "PTB_ENV_VAR", "PTB_FALLBACK", "job_differences"]

PTB_SPLITS = ("train", "valid", "test")
PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"


class JobSpecError(ValueError):
    """A job file that cannot be used; `errors` lists every problem found (the message joins them by line)."""

    def __init__(self, message, errors=None):
        super().__init__(message)
        self.errors = list(errors) if errors is not None else [message]


# ----------------------------------------------------------------------------------------------- value types

class _Mismatch(Exception):
    """Raised by a value type's `check`; `hint` is appended to the message (e.g. a did-you-mean)."""

    def __init__(self, hint=""):
        super().__init__(hint)
        self.hint = hint


class Int:
    """An integer (TOML booleans are not integers), optionally bounded: Int(gt=0), Int(ge=0)."""
    noun = "an int"

    def __init__(self, gt=None, ge=None, lt=None, le=None):
        self.gt, self.ge, self.lt, self.le = gt, ge, lt, le

    def _convert(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch()
        return value

    def check(self, value):
        value = self._convert(value)
        if ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
                or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le)):
            raise _Mismatch()
        return value

    @property
    def expected(self):
        low = (f"({_fmt(self.gt)}" if self.gt is not None else f"[{_fmt(self.ge)}" if self.ge is not None else None)
        high = (f"{_fmt(self.lt)})" if self.lt is not None else f"{_fmt(self.le)}]" if self.le is not None else None)
        if low and high:
            return f"{self.noun} in {low}, {high}"
        if low:
            return f"{self.noun} {'>' if low[0] == '(' else '>='} {low[1:]}"
        if high:
            return f"{self.noun} {'<' if high[-1] == ')' else '<='} {high[:-1]}"
        return self.noun


class Float(Int):
    """A finite float; ints are accepted and converted (lr = 1 means 1.0); booleans are not."""
    noun = "a float"

    def _convert(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch()
        value = float(value)
        if not math.isfinite(value):
            raise _Mismatch()
        return value


class Bool:
    expected = "a bool (true or false)"

    def check(self, value):
        if not isinstance(value, bool):
            raise _Mismatch()
        return value


class Str:
    def __init__(self, expected="a non-empty string"):
        self.expected = expected

    def check(self, value):
        if not isinstance(value, str) or not value:
            raise _Mismatch()
        return value


class Choice:
    """One of a fixed set of strings (case-sensitive)."""

    def __init__(self, *options):
        self.options = options

    @property
    def expected(self):
        quoted = [_toml_value(o) for o in self.options]
        return quoted[0] if len(quoted) == 1 else "one of " + ", ".join(quoted)

    def check(self, value):
        if isinstance(value, str) and value in self.options:
            return value
        close = difflib.get_close_matches(value, self.options, n=1) if isinstance(value, str) else []
        raise _Mismatch(f" (did you mean {_toml_value(close[0])}?)" if close else "")


class SplitPoints:
    """A list of block names (strings) or block indices (ints >= 1), at least one: where stages 1..K-1 start."""
    expected = 'a non-empty list of block names or indices (e.g. ["lstm.l1"] or [2])'

    def check(self, value):
        if not isinstance(value, list) or not value or not all(
                (isinstance(v, str) and v) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
                for v in value):
            raise _Mismatch()
        return value


class Table:
    """A table of the user's own settings (any TOML values under string keys), for a factory to read."""
    expected = "a table of your own settings (e.g. {width = 64, depth = 3})"

    def check(self, value):
        if not isinstance(value, dict):
            raise _Mismatch()
        return dict(value)


class AnyOf:
    """The first alternative that accepts the value: AnyOf(Choice("epoch"), Int(gt=0))."""

    def __init__(self, *alternatives):
        self.alternatives = alternatives

    @property
    def expected(self):
        parts = []
        for alt in self.alternatives:
            parts += [_toml_value(o) for o in alt.options] if isinstance(alt, Choice) else [alt.expected]
        return ", ".join(parts[:-1]) + " or " + parts[-1]

    def check(self, value):
        hint = ""
        for alt in self.alternatives:
            try:
                return alt.check(value)
            except _Mismatch as exc:
                hint = hint or exc.hint
        raise _Mismatch(hint)


# ---------------------------------------------------------------------------------------------------- schema

class _Required:
    """Default marker: the key must be given; `why` says when (for a Derived default)."""

    def __init__(self, why=""):
        self.why = why

    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Derived:
    """A default computed from the already-resolved keys of the same section (declared above it)."""
    text: str                                  # how the default reads in docs, e.g. "= hidden"
    compute: Callable[[dict], object]          # section values so far -> value, None or a _Required


@dataclass(frozen=True)
class Field:
    name: str
    type: object          # Int / Float / Bool / Str / Choice / AnyOf (anything with .check and .expected)
    default: object       # a value, None (may stay unset), REQUIRED, or a Derived
    doc: str


def _ptb_or_required(section):
    if section["kind"] == "ptb":
        return os.environ.get(PTB_ENV_VAR) or ptb_fallback()
    if section["kind"] == "chars":
        return _Required('required when [data] kind = "chars"')
    return None


_POS, _NONNEG = Int(gt=0), Int(ge=0)
_NO_OPTIONS = Derived("{} (none)", lambda section: {})


def _only_for(family, default, text):
    """A [model] default for `family` only (a value, or a function of the section); unset for the other families.
    A job with a factory builds its own model and may read any key: it gets the default of the kind it names."""
    def compute(section):
        if section["kind"] != family:
            return None
        return default(section) if callable(default) else default

    return Derived(f"{text} for {family}, else unset", compute)


def _model_fields():
    """[model]'s Fields, made from the registered model families (train/families.py) whenever [model] is read, so
    that a family registered later is a kind like the others: its `kind` choice, its keys (set only for it: the
    other families refuse them) and the keys every family shares, in the order the families list them."""
    from disttrain.train import families        # imported here: families' keys are made of this module's types
    records = families.families()
    placed = {}
    for family in records:
        for key in family.keys:
            placed.setdefault(key.name, (key, family.kind))
    for key in families.SHARED_KEYS:
        placed.setdefault(key.name, (key, None))
    keys = [Field(key.name, key.type, key.default if key in families.SHARED_KEYS
                  else _only_for(kind, key.default, key.default_text), key.doc) for key, kind in placed.values()]
    return (Field("kind", Choice(*(f.kind for f in records)), records[0].kind,
                  "model family (unless a factory is given)"),
            _MODEL_FACTORY, *keys, _MODEL_OPTIONS)


_MODEL_FACTORY = Field("factory", Str('"package.module:function"'), None,
                       "a function (job, data) -> nn.Module building your own model (replaces kind; "
                       "docs/ARCHITECTURE.md)")
_MODEL_OPTIONS = Field("options", Table(), _NO_OPTIONS,
                       'factory: your model\'s own settings, read as job.model.options["width"] '
                       "(--set model.options.width=64)")


class _Schema(Mapping):
    """SCHEMA: {section: its Fields}, [model]'s from the registered model families each time it is read."""

    def __init__(self, sections):
        self._sections = sections

    def __getitem__(self, name):
        return _model_fields() if name == "model" else self._sections[name]

    def __iter__(self):
        return iter(self._sections)

    def __len__(self):
        return len(self._sections)


SCHEMA = _Schema({
    "model": None,            # _model_fields()
    "data": (
        Field("kind", Choice("ptb", "chars", "default_corpus"), "default_corpus", "corpus (unless a factory is given)"),
        Field("factory", Str('"package.module:function"'), None,
              "a function (job) -> data source supplying your own data (replaces kind; docs/ARCHITECTURE.md)"),
        Field("path", Str("a path"),
              Derived(f"${PTB_ENV_VAR} or {PTB_FALLBACK} for ptb; required for chars", _ptb_or_required),
              "PTB directory (ptb.{train,valid,test}.txt[.gz]) or the text file for chars"),
        Field("batch_size", _POS, 20, "sequences per batch (global, over all data-parallel ranks)"),
        Field("bptt", _POS, 35, "truncated-BPTT window, in tokens"),
        Field("max_bytes", _POS, 2_000_000, "size cap of the default corpus, in bytes"),
        Field("options", Table(), _NO_OPTIONS,
              'factory: your data\'s own settings, read as job.data.options["noise"] (--set data.options.noise=0.1)'),
    ),
    "optim": (
        Field("kind", Choice("sgd", "adam", "adamw"), "sgd", "optimizer"),
        Field("lr", Float(gt=0), 1.0, "learning rate"),
        Field("momentum", Float(ge=0), 0.0, "SGD momentum"),
        Field("weight_decay", Float(ge=0), 0.0, "L2 penalty (decoupled for adamw)"),
        Field("clip_norm", Float(gt=0), None, "clip the global gradient norm to this (unset = no clipping)"),
        Field("loss", Choice("token_mean", "sum_over_time"), "token_mean",
              'gradient of: the mean loss per token, or (Zaremba et al.) the loss summed over the bptt steps '
              'and averaged over the batch, T times larger'),
        Field("decay_after_epoch", _NONNEG, 0, "multiply lr by `decay` after every epoch past this one (0 = never)"),
        Field("decay", Float(gt=0, le=1), 1.0, "lr decay factor per epoch"),
        Field("warmup_steps", _NONNEG, 0, "linear lr warm-up steps"),
    ),
    "train": (
        Field("epochs", _POS, 1, "passes over the training split"),
        Field("max_steps", _POS, None, "stop after this many optimizer steps (unset = no limit)"),
        Field("eval_every", AnyOf(Choice("epoch"), _POS), "epoch", 'evaluate on valid every N steps, or "epoch"'),
        Field("checkpoint_every", _NONNEG, 500, "write a job checkpoint every N steps (0 = only at the end)"),
        Field("keep_checkpoints", _POS, 2, "keep the newest N job checkpoints (older ones are deleted)"),
        Field("keep_best", Bool(), False,
              "also keep the checkpoint of the lowest valid loss (a checkpoint is written at each new best)"),
        Field("on_nonfinite", Choice("stop", "skip"), "stop",
              'a NaN or infinite loss or gradient norm: "stop" the run, or "skip" that step\'s update (the run '
              "stops after 10 skips in a row)"),
        Field("log_every", _POS, 50, "log metrics every N steps"),
        Field("seed", _NONNEG, 0, "random seed"),
        Field("device", Choice("cpu", "cuda"), "cpu", "where tensors live"),
    ),
    "memory": (
        Field("activation_checkpointing", AnyOf(Choice("none", "sqrt", "auto"), _POS), "none",
              'recompute activations in segments: "none", "sqrt", a segment count, or "auto": the plan with the '
              "least recomputation that keeps a step under budget_mb (docs/MEMORY.md)"),
        Field("budget_mb", Float(gt=0), None,
              "array memory of a process (MiB) at a step's peak, parameters, gradients and optimizer state "
              'included (memory.json\'s measured_peak_bytes): a step over it stops the run; "auto" checkpointing '
              "fits the step into what the parameters and optimizer state leave (unset = no limit)"),
    ),
    "parallel": (
        Field("mode", Choice("local", "data", "pipeline", "ps"), "local", "how training is distributed"),
        Field("bucket_mb", Float(gt=0), 25.0, "gradient-bucket size for data-parallel allreduce, in MiB"),
        Field("overlap", AnyOf(Bool(), Choice("auto")), "auto",
              "data: allreduce gradient buckets while backward runs (true), after it (false), or time the first "
              'steps both ways and keep the faster ("auto"; same numbers either way)'),
        Field("shard_optimizer", Int(ge=0, le=2), 0,
              "data: 1 keeps 1/N of the optimizer state on each rank (ZeRO stage 1), 2 also reduce-scatters the "
              "gradients (stage 2); 0 = every rank holds all of it"),
        Field("stages", _POS, 2, "pipeline: stages per model replica (the world size must be a multiple)"),
        Field("micro_batches", _POS, 4, "pipeline: micro-batches per step (must divide the per-replica batch)"),
        Field("schedule", Choice("1f1b", "gpipe"), "1f1b",
              "pipeline: all forwards then all backwards (gpipe) or one-forward-one-backward (1f1b)"),
        Field("split_points", SplitPoints(), None,
              "pipeline: blocks where stages 1..K-1 start, overriding the balancer (unset = balanced)"),
        Field("stage_checkpointing", Bool(), False, "pipeline: recompute each stage's activations in backward"),
        Field("timeout_s", Float(gt=0), 300.0,
              "data, pipeline: seconds a rank waits in one collective or message before the job reports which "
              "ranks did not arrive and aborts (README: A hung rank)"),
    ),
    "ps": (   # parameter-server mode (disttrain/paramserver, docs/PARAMSERVER.md)
        Field("servers", _POS, 1, "parameter-server processes (each owns a share of every large tensor)"),
        Field("workers", _POS, 2, "worker processes; each trains on batch_size / workers of the streams"),
        Field("consistency", Choice("async", "ssp", "sync"), "async",
              'when workers wait: never ("async"), more than `staleness` clocks ahead ("ssp"), every step ("sync")'),
        Field("staleness", _NONNEG, 3, "ssp: the most clocks a worker may run ahead of the slowest live worker"),
        Field("overlap", Bool(), False,
              "async, ssp with staleness >= 1: push step t while computing step t+1 (faster steps, but each "
              "gradient misses the worker's own last update: slower learning, docs/PARAMSERVER.md)"),
        Field("scale_pushes", Bool(), True,
              "async, ssp: weight each push by 1/workers, so `workers` pushes make one step of the combined batch "
              "(what sync mode's average does); false: every push is a full step (an effective LR x workers)"),
        Field("heartbeat_interval", Float(gt=0), 1.0, "seconds between a worker's heartbeats"),
        Field("heartbeat_timeout", Float(gt=0), 10.0, "seconds of silence before a worker (or server) counts as gone"),
        Field("reconnect_timeout", Float(gt=0), 120.0,
              "seconds a worker waits for a server to answer its join, at the start or after losing it"),
        Field("snapshot_every", _NONNEG, 500, "server snapshot every N updates (0 = not by count; servers also "
                                                 "snapshot at start, on SIGTERM and at exit)"),
        Field("snapshot_every_s", Float(ge=0), 60.0,
              "server snapshot every N seconds in which it applied updates (0 = not by time)"),
        Field("reject_nonfinite", Bool(), True, "servers refuse gradients holding NaN or inf"),
        Field("log_every", Float(ge=0), 10.0, "seconds between a server's update-rate log lines (0 = never)"),
    ),
})


def describe_schema():
    """The schema as a Markdown table (for docs and `--help`)."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for section, fields in SCHEMA.items():
        for f in fields:
            if isinstance(f.default, Derived):
                default = f.default.text
            elif f.default is None:
                default = "unset"
            else:
                default = _toml_value(f.default) if f.default is not REQUIRED else "required"
            lines.append(f"| [{section}] {f.name} | {f.type.expected} | {default} | {f.doc} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the spec

class Section:
    """One resolved section, read-only: `spec.optim.lr`, `spec.optim["lr"]`, `spec.optim.to_dict()`."""
    __slots__ = ("_name", "_values")

    def __init__(self, name, values):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"[{self._name}] has no key {key!r}{_did_you_mean(key, list(self._values))}; "
                                 f"valid keys: {', '.join(self._values)}") from None

    def __getitem__(self, key):
        return self._values[key]

    def __setattr__(self, key, value):
        raise AttributeError("a JobSpec is read-only; change a job with overrides (section.key=value)")

    def __iter__(self):
        return iter(self._values)

    def __eq__(self, other):
        return isinstance(other, Section) and (self._name, dict(self._values)) == (other._name, dict(other._values))

    __hash__ = None

    def __reduce__(self):
        return (Section, (self._name, dict(self._values)))

    def to_dict(self):
        return dict(self._values)

    def __repr__(self):
        return f"Section({self._name!r}, {dict(self._values)!r})"


class JobSpec:
    """A validated job with every default filled: `spec.model.hidden`, `spec.to_dict()`, `spec.to_toml()`.

    `source` is the job file it came from (a str, or None). Unset optional keys read as None.
    """
    __slots__ = ("source", "_sections")

    def __init__(self, sections, source=None):
        object.__setattr__(self, "source", None if source is None else str(source))
        object.__setattr__(self, "_sections", {name: Section(name, sections[name]) for name in SCHEMA})

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(f"no section [{name}]{_did_you_mean(name, SCHEMA, '[', ']')}; "
                                 f"valid sections: {_sections_list()}") from None

    def __getitem__(self, name):
        return self._sections[name]

    def __setattr__(self, key, value):
        raise AttributeError("a JobSpec is read-only; change a job with overrides (section.key=value)")

    def __eq__(self, other):
        return isinstance(other, JobSpec) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __reduce__(self):
        return (JobSpec, (self.to_dict(), self.source))

    def to_dict(self):
        """{section: {key: value}} with every key of the schema (None where unset)."""
        return {name: section.to_dict() for name, section in self._sections.items()}

    def to_toml(self, only=None, note=None):
        """The resolved job as TOML text; unset keys are written as comments. load_job reads it back equal.

        only: {section: None (every key) or the keys to write} to write part of the job; note: a comment line
        after the header (e.g. what the part leaves out)."""
        header = f"# disttrain job spec, resolved{' from ' + self.source if self.source else ''}\n"
        header += f"# {note}\n" if note else ""
        sections = self.to_dict()
        if only is not None:
            sections = {name: {key: value for key, value in sections[name].items() if keys is None or key in keys}
                        for name, keys in only.items()}
        return header + _dump_toml(sections)

    def __repr__(self):
        return f"JobSpec(source={self.source!r}, {self.to_dict()!r})"


# Keys added to the schema after jobs were first recorded (checkpoints, ranks' jobs): a job without one meant
# this value
ADDED_KEYS = {("model", "options"): {}, ("data", "options"): {}}


def job_differences(first, second):
    """[(section, key, first's value, second's)] wherever two jobs as dicts (JobSpec.to_dict()) differ. The [model]
    keys that neither job's model family reads are not compared: a job written by an earlier disttrain recorded
    the LSTM's hidden, embed and init_scale for every family."""
    unread = _unread_model_keys(first.get("model", {})) & _unread_model_keys(second["model"])
    diffs = []
    for section in second:
        keys = set(first.get(section, {})) | set(second.get(section, {}))
        for key in sorted(keys - unread if section == "model" else keys):
            a, b = first.get(section, {}).get(key, ADDED_KEYS.get((section, key))), second.get(section, {}).get(key)
            if a != b:
                diffs.append((section, key, a, b))
    return diffs


# ------------------------------------------------------------------------------------------------- loading

def load_job(path, overrides=()):
    """Read, validate and complete the TOML job file at `path`.

    overrides: strings "section.key=value" (as given to `--set`), applied over the file; the value is parsed
    as a TOML value (`2`, `0.5`, `true`, `"x"`), or taken as a bare string when it is not one (`cuda`).
    Raises JobSpecError listing every problem found.
    """
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise JobSpecError(f"{source}: no such job file (looked for {os.path.abspath(path)})") from None
    except IsADirectoryError:
        raise JobSpecError(f"{source}: is a directory, expected a TOML job file") from None
    except OSError as exc:
        raise JobSpecError(f"{source}: cannot read the job file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobSpecError(f"{source}: not UTF-8 text (bad byte at offset {exc.start}); "
                           f"expected a TOML job file") from None
    return loads_job(text, overrides, source=source)


def loads_job(text, overrides=(), source="<string>"):
    """As load_job, from TOML text; `source` names it in error messages and becomes `spec.source`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        lineno = getattr(exc, "lineno", None)
        if lineno is not None and "line" not in message:
            message += f" (at line {lineno})"
        raise JobSpecError(f"{source}: TOML syntax error: {message}") from None
    return _build(data, overrides, source)


def _build(data, overrides, source):
    """The JobSpec of a parsed job file (`data`) with `overrides` applied; JobSpecError listing every problem."""
    errors = []
    values = _read_tables(data, source, errors)
    origins = _apply_overrides(values, overrides, source, errors)
    resolved = _resolve(values, origins, source, errors)
    if not errors:
        errors += (_options_problems(resolved, origins, source)
                   + _model_problems(resolved, values["model"], origins, source)
                   + _pipeline_problems(resolved, origins, source) + _data_problems(resolved, origins, source)
                   + _memory_problems(resolved, origins, source))
    if errors:
        raise JobSpecError("\n".join(errors), errors)
    return JobSpec(resolved, source)


def _read_tables(data, source, errors):
    """{section: {key: value}} of the file's known sections and keys; each unknown one appended to errors."""
    values = {name: {} for name in SCHEMA}
    for name, table in data.items():
        if name not in SCHEMA:
            if isinstance(table, dict):
                errors.append(f"{source}: unknown section [{name}]{_did_you_mean(name, SCHEMA, '[', ']')}; "
                              f"valid sections: {_sections_list()}")
            else:
                errors.append(f"{source}: {_key(name)} = {_toml_value(table)} is outside any section; "
                              f"expected it under one of the sections {_sections_list()}")
            continue
        if not isinstance(table, dict):
            errors.append(f"{source}: {_key(name)} = {_toml_value(table)}: expected a section [{name}]")
            continue
        for key, value in table.items():
            problem = _unknown_key(name, key)
            if problem:
                errors.append(f"{source}: {problem}")
            else:
                values[name][key] = value
    return values


def _apply_overrides(values, overrides, source, errors):
    """Apply "section.key=value" strings onto values; returns {(section, key): where it came from} for each."""
    origins = {}
    for override in (overrides,) if isinstance(overrides, str) else overrides:
        label = f"{source}: override {_toml_value(override)}"
        dotted, eq, text = override.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not eq or not dot or not section or not key:
            errors.append(f"{label}: expected section.key=value (e.g. optim.lr=0.5)")
            continue
        if section not in SCHEMA:
            errors.append(f"{label}: unknown section [{section}]{_did_you_mean(section, SCHEMA, '[', ']')}; "
                          f"valid sections: {_sections_list()}")
            continue
        key, _, inner = key.partition(".")          # model.options.width: a key of the table [model] options
        problem = _unknown_key(section, key) or (inner and _not_a_table(section, key))
        if problem:
            errors.append(f"{label}: {problem}")
            continue
        value = _parse_value(text.strip())
        if inner:
            table = values[section][key] = dict(values[section].get(key) or {})
            table[inner] = value
        else:
            values[section][key] = value
        origins[section, key] = label
    return origins


def _resolve(values, origins, source, errors):
    """Every key of the schema: its value checked against its type, or its default (derived ones computed)."""
    resolved = {}
    for section, fields in SCHEMA.items():
        out = resolved[section] = {}
        given = values[section]
        for f in fields:
            where = origins.get((section, f.name), source)
            if f.name in given:
                try:
                    out[f.name] = f.type.check(given[f.name])
                except _Mismatch as exc:
                    errors.append(f"{where}: [{section}] {f.name} = {_toml_value(given[f.name])}: "
                                  f"expected {f.type.expected}{exc.hint}")
                continue
            default = f.default
            if isinstance(default, Derived):
                try:
                    default = default.compute(out)
                except KeyError:      # a key it depends on was invalid (and is reported already)
                    continue
            if isinstance(default, _Required):
                why = f" ({default.why})" if default.why else ""
                errors.append(f"{where}: [{section}] {f.name} is missing: expected {f.type.expected}{why}")
                continue
            out[f.name] = default
    return resolved


def _model_problems(resolved, given, origins, source):
    """A key of another model family than the job's would be ignored: a mistake to report, not to skip silently."""
    model = resolved["model"]
    if model["factory"] is not None:
        return []
    problems = []
    for key in sorted(set(given) & foreign_model_keys(model["kind"]), key=list(given).index):
        problems.append(f"{origins.get(('model', key), source)}: [model] {key} = {_toml_value(given[key])}: "
                        f'kind = "{model["kind"]}" does not use it (its keys: {", ".join(_family_keys(model["kind"]))})'
                        f"; remove it, or set the kind it belongs to")
    return problems


def _options_problems(resolved, origins, source):
    """[model] or [data] options without the factory that reads them would be ignored."""
    return [f"{origins.get((section, 'options'), source)}: [{section}] options = "
            f"{_toml_value(resolved[section]['options'])}: only a factory reads them; set [{section}] factory or "
            "remove them"
            for section in ("model", "data") if resolved[section]["options"] and resolved[section]["factory"] is None]


def foreign_model_keys(kind):
    """The [model] keys that only other families than `kind` read."""
    from disttrain.train.families import families      # imported here: families' keys use this module's types
    return {key for family in families() if family.kind != kind for key in family.own_keys}


def _family_keys(kind):
    left_out = {"kind", "factory", "options"} | foreign_model_keys(kind)
    return [f.name for f in SCHEMA["model"] if f.name not in left_out]


def _unread_model_keys(model):
    """The keys of a [model] section (a dict) that its model does not read: none when a factory builds it."""
    return set() if model.get("factory") is not None else foreign_model_keys(model.get("kind"))


def _pipeline_problems(resolved, origins, source):
    """Checks across keys of a pipeline job (the world size is checked at launch, when it is known)."""
    p, batch = resolved["parallel"], resolved["data"]["batch_size"]
    if p["mode"] != "pipeline":
        return []
    where = lambda section, key: origins.get((section, key), source)   # noqa: E731
    problems = []
    if batch % p["micro_batches"]:
        problems.append(f"{where('parallel', 'micro_batches')}: [parallel] micro_batches = {p['micro_batches']}: "
                        f"expected a divisor of [data] batch_size = {batch} (each micro-batch is a share of the "
                        f"streams)")
    if p["split_points"] is not None and len(p["split_points"]) != p["stages"] - 1:
        problems.append(f"{where('parallel', 'split_points')}: [parallel] split_points = "
                        f"{_toml_value(p['split_points'])}: expected stages - 1 = {p['stages'] - 1} entries")
    return problems


def _data_problems(resolved, origins, source):
    """A key the chosen corpus would ignore is a mistake to report, not to skip silently."""
    data = resolved["data"]
    if data["kind"] == "default_corpus" and data["path"] is not None:
        return [f"{origins.get(('data', 'path'), source)}: [data] path = {_toml_value(data['path'])}: "
                f'[data] kind = "default_corpus" reads no file (it is the corpus embedded in disttrain); remove '
                f'the path, or set kind = "chars" (a text file) or "ptb" (a PTB directory)']
    return []


def _memory_problems(resolved, origins, source):
    """"auto" checkpointing plans a whole model's step for a budget: it needs one, and a pipeline stage is not one."""
    memory, mode = resolved["memory"], resolved["parallel"]["mode"]
    if memory["activation_checkpointing"] != "auto":
        return []
    where = origins.get(("memory", "activation_checkpointing"), source)
    if memory["budget_mb"] is None:
        return [f'{where}: [memory] activation_checkpointing = "auto" needs [memory] budget_mb (the MiB a training '
                f"step may use, which the plan must keep under)"]
    if mode == "pipeline":
        return [f'{where}: [memory] activation_checkpointing = "auto" plans a whole model\'s step, not a pipeline '
                f'stage\'s; in [parallel] mode = "pipeline" use [parallel] stage_checkpointing']
    return []


def _parse_value(text):
    """A TOML value (`2`, `0.5`, `true`, `"x"`, `1e-3`), else the text itself as a bare string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if len(parsed) == 1 else text


def _unknown_key(section, key):
    names = [f.name for f in SCHEMA[section]]
    if key in names:
        return None
    return (f"[{section}] unknown key {_toml_value(key)}{_did_you_mean(key, names)}; "
            f"valid keys in [{section}]: {', '.join(names)}")


def _not_a_table(section, key):
    if any(f.name == key and isinstance(f.type, Table) for f in SCHEMA[section]):
        return None
    return f"[{section}] {key} is not a table: a dotted key names an entry of [model] or [data] options only"


def _did_you_mean(word, options, before='"', after='"'):
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {before}{close[0]}{after}?)" if close else ""


def _sections_list():
    return ", ".join(f"[{name}]" for name in SCHEMA)


# ------------------------------------------------------------------------------------------------ data paths

def check_paths(spec):
    """Check that the data files of `spec` exist; return the resolved data path (None for default_corpus).

    ptb: `data.path` must be a directory holding ptb.{train,valid,test}.txt, each possibly gzipped.
    chars: `data.path` must be a file. Relative paths are taken from the current working directory.
    """
    source = spec.source or "<job>"
    kind, path = spec.data.kind, spec.data.path
    if kind == "default_corpus":
        return None
    resolved = Path(os.path.abspath(os.path.expanduser(path)))
    where = f"{source}: [data] path = {_toml_value(path)} (resolved to {resolved})"
    if kind == "chars":
        if resolved.is_file():
            return resolved
        problem = "is a directory" if resolved.is_dir() else "does not exist"
        raise JobSpecError(f'{where}: {problem}; expected a text file for [data] kind = "chars"')
    if not resolved.is_dir():
        problem = "is a file, not a directory" if resolved.exists() else "does not exist"
    else:
        missing = [f"ptb.{split}.txt(.gz)" for split in PTB_SPLITS
                   if not any((resolved / f"ptb.{split}.txt{gz}").is_file() for gz in (".gz", ""))]
        if not missing:
            return resolved
        problem = "is missing " + ", ".join(missing)
    env = os.environ.get(PTB_ENV_VAR)
    env_now = f"now {env!r}" if env else "now unset"
    raise JobSpecError(
        f"{where}: {problem}; expected a directory holding ptb.train.txt, ptb.valid.txt and ptb.test.txt "
        f"(each possibly .gz). Set [data] path, or the {PTB_ENV_VAR} environment variable ({env_now}), to such "
        f"a directory. The standard files are Mikolov's PTB language-modelling split: data/ptb.*.txt in "
        f"{PTB_URL}")


# ------------------------------------------------------------------------------------------- a tiny TOML writer

def _dump_toml(sections):
    """TOML text for {section: {key: scalar}}; keys whose value is None are written as comments."""
    blocks = []
    for name, table in sections.items():
        lines = [f"[{_key(name)}]"]
        for key, value in table.items():
            lines.append(f"# {_key(key)} (unset)" if value is None else f"{_key(key)} = {_toml_value(value)}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value):
    """One value in TOML syntax (also used to show bad values in error messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(name):
    """A key as TOML writes it: bare when it can be, quoted otherwise."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    return name if bare else _toml_value(name)


def _fmt(number):
    return repr(number) if isinstance(number, float) and not number.is_integer() else str(int(number))
