"""The model families a job names by `[model] kind`: one record per family, and the registry of them.

A record holds everything disttrain knows of a family apart from its Module (disttrain/models): its [model]
keys, how to build it from the job, how the job log describes it, and the pieces of the memory estimate made
from the job alone (train/memory_plan.py). Job specs (jobspec.py), build.py and memory_plan.py look the
job's family up here and know no family themselves.

    family = family_of(spec.model.kind)          # JobSpecError naming the kind and the known ones
    model = family.build(spec, vocab_size)
    register_family(ModelFamily(kind="my_lm", keys=(...), build=..., describe=..., parameter_count=...,
                                activation_floats=..., width=...))
    unregister_family("my_lm")

Keys. A family lists the [model] keys it reads, in the order a resolved job writes them: its own (a
ModelKey; set only when the job names that kind, and refused for any other kind) and the ones every family
shares (LAYERS, DROPOUT, TIE_WEIGHTS, accepted for every kind: a family that does not read one must refuse
it in its build). An own key belongs to one family only.
"""
from dataclasses import dataclass
from typing import Callable

from disttrain.checkpointing.plan import segment_bounds
from disttrain.models import LSTMLanguageModel, TransformerLanguageModel
from disttrain.train.jobspec import Bool, Float, Int, JobSpecError

__all__ = ["ModelKey", "ModelFamily", "SHARED_KEYS", "LAYERS", "DROPOUT", "TIE_WEIGHTS", "register_family",
           "unregister_family", "family_of", "families"]


@dataclass(frozen=True)
class ModelKey:
    """One [model] key: what jobspec's Field needs. default: a value, or a function of the [model] keys
    declared before it (default_text says how it reads, e.g. "= hidden")."""
    name: str
    type: object             # a jobspec value type: Int(gt=0), Float(...), Bool(), Choice(...)
    default: object
    default_text: str
    doc: str


@dataclass(frozen=True)
class ModelFamily:
    """A [model] kind. The functions take the resolved job (spec) or its [model] section (model)."""
    kind: str
    keys: tuple                                 # ModelKeys: its own and the SHARED_KEYS it reads, in job order
    build: Callable                             # (spec, vocab_size) -> Module; JobSpecError for keys that clash
    describe: Callable                          # (model) -> "2x200 LSTM": the job log's model
    parameter_count: Callable                   # (model, vocab_size) -> its exact number of parameters
    activation_floats: Callable                 # (spec, vocab_size) -> numbers one stream's training step keeps
    width: Callable                             # (model) -> "hidden = 200": the too-large message's width

    @property
    def own_keys(self):
        return tuple(key.name for key in self.keys if key not in SHARED_KEYS)


LAYERS = ModelKey("layers", Int(gt=0), 2, "2", "number of layers")
DROPOUT = ModelKey("dropout", Float(ge=0, lt=1), 0.0, "0.0", "dropout probability (0 = off)")
TIE_WEIGHTS = ModelKey("tie_weights", Bool(), False, "false", "share the embedding and output-projection weights")
SHARED_KEYS = (LAYERS, DROPOUT, TIE_WEIGHTS)


# ---------------------------------------------------------------------------------------------------- lstm_lm

def _build_lstm_lm(spec, vocab_size):
    m = spec.model
    return LSTMLanguageModel(vocab_size, hidden=m.hidden, layers=m.layers, embed=m.embed, dropout=m.dropout,
                             init_scale=m.init_scale, tie_weights=m.tie_weights)


def _lstm_lm_parameters(m, vocab_size):
    """Embedding V x E; per layer 4H x (in + H) weights and two 4H biases; decoder H x V + V (its weight the
    embedding's when tied)."""
    hidden, embed, layers = m.hidden, m.embed, m.layers
    lstm = sum(4 * hidden * ((embed if k == 0 else hidden) + hidden) + 8 * hidden for k in range(layers))
    decoder = hidden * vocab_size + vocab_size
    tied = hidden * vocab_size if m.tie_weights else 0
    return vocab_size * embed + lstm + decoder - tied


def _lstm_lm_activation_floats(spec, vocab_size):
    """Per time step the embedding (E), per layer the input, gates and cell states (in + 8H, and H for a
    dropout mask), and the logits and their gradient (2V). Sequence checkpointing keeps the last segment of T/S
    steps and one recomputed in backward, plus the S carried states."""
    m, steps = spec.model, spec.data.bptt
    per_step = m.embed + 2 * vocab_size + sum((m.embed if k == 0 else m.hidden) + 9 * m.hidden
                                              for k in range(m.layers))
    segments = spec.memory.activation_checkpointing
    if segments in ("none", "auto"):           # "auto" keeps at most what "none" keeps
        return steps * per_step
    bounds = segment_bounds(steps, segments)
    kept_steps = 2 * max(b - a for a, b in zip(bounds, bounds[1:]))     # the last segment + one recomputed
    return kept_steps * per_step + (len(bounds) - 1) * m.layers * 2 * m.hidden


HIDDEN = ModelKey("hidden", Int(gt=0), 200, "200", "lstm_lm: hidden units per layer")
LSTM_LM = ModelFamily(
    kind="lstm_lm",
    keys=(HIDDEN,
          ModelKey("embed", Int(gt=0), lambda s: s["hidden"], "= hidden", "lstm_lm: embedding size"),
          LAYERS, DROPOUT,
          ModelKey("init_scale", Float(gt=0), 0.1, "0.1",
                   "lstm_lm: weights drawn uniformly from [-init_scale, init_scale] (transformer_lm: N(0, 0.02), "
                   "GPT-2's)"),
          TIE_WEIGHTS),
    build=_build_lstm_lm,
    describe=lambda m: f"{m.layers}x{m.hidden} LSTM",
    parameter_count=_lstm_lm_parameters,
    activation_floats=_lstm_lm_activation_floats,
    width=lambda m: f"hidden = {m.hidden}",
)


# ---------------------------------------------------------------------------------------------- transformer_lm

def _build_transformer_lm(spec, vocab_size):
    """Its keys checked against each other and against [data] bptt."""
    m, source = spec.model, spec.source or "<job>"
    if m.d_model % m.heads:
        raise JobSpecError(f"{source}: [model] d_model = {m.d_model} is not a multiple of [model] heads = {m.heads}")
    if spec.data.bptt > m.max_len:
        raise JobSpecError(f"{source}: [data] bptt = {spec.data.bptt} is longer than [model] max_len = {m.max_len}, "
                           "the positions the transformer has embeddings for; raise max_len or lower bptt")
    return TransformerLanguageModel(vocab_size, d_model=m.d_model, heads=m.heads, layers=m.layers, d_ff=m.d_ff,
                                    max_len=m.max_len, dropout=m.dropout, tie_weights=m.tie_weights)


def _transformer_lm_parameters(m, vocab_size):
    """Token and position embeddings, per block the attention's in and out projections, the MLP's two layers
    and two LayerNorms, the final LayerNorm and the decoder."""
    width, ff = m.d_model, m.d_ff
    block = (4 * width + 2 * ff) * width + (5 * width + ff) + 4 * width    # weights, biases, two LayerNorms
    body = vocab_size * width + m.max_len * width + m.layers * block + 2 * width
    return body + (0 if m.tie_weights else width * vocab_size) + vocab_size


def _transformer_lm_activation_floats(spec, vocab_size):
    """Per token and block the LayerNorms' inputs and outputs, q, k, v, the attention's output and its
    projection, the residual sums and the MLP's two hidden layers (9 D + 2 F; the attention op recomputes its
    probabilities in backward instead of keeping them); the embeddings, the final LayerNorm and the logits with
    their gradient (2 D + 2 V). Checkpointing the blocks in S segments keeps the S segment inputs and one
    segment's blocks at a time (backward frees the last segment's activations before it recomputes another)."""
    m, steps, segments = spec.model, spec.data.bptt, spec.memory.activation_checkpointing
    per_block = steps * (9 * m.d_model + 2 * m.d_ff)
    if segments in ("none", "auto") or m.layers == 0:
        kept = m.layers * per_block
    else:
        bounds = segment_bounds(m.layers, segments)
        kept = max(b - a for a, b in zip(bounds, bounds[1:])) * per_block + (len(bounds) - 1) * steps * m.d_model
    return kept + steps * (2 * m.d_model + 2 * vocab_size)


TRANSFORMER_LM = ModelFamily(
    kind="transformer_lm",
    keys=(LAYERS, DROPOUT, TIE_WEIGHTS,
          ModelKey("d_model", Int(gt=0), 128, "128", "transformer_lm: model width"),
          ModelKey("heads", Int(gt=0), 4, "4", "transformer_lm: attention heads (must divide d_model)"),
          ModelKey("d_ff", Int(gt=0), lambda s: 4 * s["d_model"], "= 4 * d_model",
                   "transformer_lm: hidden units of each block's MLP"),
          ModelKey("max_len", Int(gt=0), 256, "256", "transformer_lm: positions with an embedding (at least [data] "
                                                     "bptt)")),
    build=_build_transformer_lm,
    describe=lambda m: f"{m.layers}-block transformer (d_model {m.d_model}, {m.heads} heads)",
    parameter_count=_transformer_lm_parameters,
    activation_floats=_transformer_lm_activation_floats,
    width=lambda m: f"d_model = {m.d_model}",
)


# ---------------------------------------------------------------------------------------------------- registry

_FAMILIES = {family.kind: family for family in (LSTM_LM, TRANSFORMER_LM)}
_RESERVED = {"kind", "factory", "options"}        # [model] keys of jobspec's own


def families():
    """The registered families, in registration order (the order of their keys in a job); the first is the
    kind a job without `[model] kind` gets."""
    return tuple(_FAMILIES.values())


def family_of(kind):
    """The family registered as `kind`; JobSpecError naming it and the known ones otherwise."""
    family = _FAMILIES.get(kind)
    if family is None:
        known = ", ".join(f'"{k}"' for k in _FAMILIES)
        raise JobSpecError(f'[model] kind = "{kind}": no model family of that name (known: {known})')
    return family


def register_family(family):
    """Make `family` a [model] kind jobs may name. ValueError for a kind already registered, or an own key that
    another family or jobspec itself has."""
    if family.kind in _FAMILIES:
        raise ValueError(f"model family {family.kind!r} is registered already")
    taken = _RESERVED | {key.name for key in SHARED_KEYS} | {key for other in _FAMILIES.values() for key in other.own_keys}
    clashes = [name for name in family.own_keys if name in taken]
    if clashes:
        raise ValueError(f"model family {family.kind!r}: the [model] keys {', '.join(clashes)} belong to another "
                         "family or to every job; give its own keys names of their own")
    _FAMILIES[family.kind] = family


def unregister_family(kind):
    """Forget the family `kind` (jobs naming it are refused from now on); returns its record."""
    return _FAMILIES.pop(family_of(kind).kind)
