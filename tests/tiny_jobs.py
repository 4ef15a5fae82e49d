"""The tiny job every test package trains (a 1-layer LSTM of 16 units on a few KB of text, milliseconds a step),
and its variants as overrides of it, so that a change to the job's defaults is made in one place.

    tiny_job(*overrides, text=None, source=None) -> JobSpec       on the embedded corpus, or on `text` (a path)
    tiny_job_toml(*overrides, text=None) -> str                   the same as a job file
"""
import json
import tomllib

from disttrain.train.jobspec import loads_job

TINY_JOB = """
[model]
hidden = 16
layers = 1
[data]
kind = "default_corpus"
max_bytes = 4000
batch_size = 4
bptt = 8
[optim]
kind = "adam"
lr = 0.01
clip_norm = 1.0
[train]
epochs = 1
log_every = 1
checkpoint_every = 0
seed = 3
"""

DATA_PARALLEL = ("train.max_steps=6", "train.log_every=2", "train.eval_every=3", "parallel.mode=data",
                 "parallel.bucket_mb=0.002")
PARAMETER_SERVER = ("train.log_every=20", "parallel.mode=ps", "ps.heartbeat_interval=0.2", "ps.heartbeat_timeout=2.0",
                    "ps.reconnect_timeout=20.0", "ps.log_every=0.0")


def tiny_job(*overrides, text=None, source=None):
    """The tiny job with `overrides` ("section.key=value"); on the character text file `text` when given. With
    an override to model.kind = "transformer_lm", the LSTM's hidden = 16 is left out (that family refuses it)."""
    on_text = ('data.kind="chars"', f'data.path="{text}"') if text is not None else ()
    return loads_job(tiny_job_base(overrides), [*on_text, *overrides], source=source)


def switches_to_transformer(overrides):
    return any(o.replace(" ", "").replace("'", '"') == 'model.kind="transformer_lm"' for o in overrides)


def tiny_job_base(overrides):
    """TINY_JOB, without the LSTM-only [model] hidden when `overrides` switch to the Transformer."""
    return TINY_JOB.replace("hidden = 16\n", "") if switches_to_transformer(overrides) else TINY_JOB


def tiny_job_toml(*overrides, text=None):
    """tiny_job(...) as a job file holding only the keys set (derived defaults, such as embed = hidden, stay
    derived when the command line changes a key)."""
    tiny_job(*overrides, text=text)                   # checked as a job
    sections = tomllib.loads(tiny_job_base(overrides))
    on_text = ('data.kind="chars"', f'data.path="{text}"') if text is not None else ()
    for override in (*on_text, *overrides):
        name, value = override.split("=", 1)
        section, key = name.split(".")
        sections.setdefault(section, {})[key] = _value(value)
    return "".join(f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
                   for section, keys in sections.items())


def _value(text):
    """An override's value as load_job reads it: a TOML value, else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
