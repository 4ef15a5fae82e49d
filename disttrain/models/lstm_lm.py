"""The LSTM language model of Zaremba et al. (2014): embedding -> LSTM -> linear decoder."""
from contextlib import contextmanager

from disttrain import nn
from disttrain.autograd.grad_mode import is_grad_enabled
from disttrain.autograd.ops import dropout, stack, unbind
from disttrain.checkpointing.plan import check_setting, plan_for, run_chain
from disttrain.models.blocks import ModelPart, ParameterSubset
from disttrain.nn import functional as F
from disttrain.nn import init
from disttrain.tensor.creation import zeros


class LSTMLanguageModel(nn.Module):
    """forward(tokens (T, B) int64, state=None) -> (logits (T*B, V), state);
    forward_loss(tokens (T, B), targets (T, B), state=None) -> (mean cross-entropy, state).

    state is the (h, c) pair of the LSTM, each (layers, B, hidden): a carried state
    (disttrain.models.protocol) whose streams lie along axis 1; the training loop detaches it
    between TBPTT segments. Dropout (Zaremba's "medium"/"large" regularisation) is applied
    to the embedding output, between LSTM layers and before the decoder. Every weight starts
    uniform in [-init_scale, init_scale] as in the paper.

    checkpoint_segments (None, "sqrt", an int or a Plan over the T steps; may be changed at any time):
    sequence activation checkpointing of a training step.
    - forward_loss runs the T steps as the segments of disttrain.checkpointing.plan.plan_for (for
      "sqrt": round(sqrt(T)) segments, all but the last recomputed), each kept call running
      embedding -> all LSTM layers -> decoder -> summed cross-entropy over its steps: between
      recomputed segments only the carried (h, c) of every layer is kept, so a "sqrt" step holds
      O(sqrt(T)) activations, not O(T) (Chen et al. 2016 with the unrolled RNN and its per-step loss as
      the chain), and a nested (binomial) Plan O(log T).
    - forward returns all T*B logits, O(T) anyway, so there only the LSTM's per-step internals
      are checkpointed (nn.LSTM's recurrent checkpointing, which this setting switches too).
    """

    carries_state = True
    state_batch_axis = 1

    def __init__(self, vocab_size, hidden, layers=2, embed=None, dropout=0.0, init_scale=0.1, tie_weights=False,
                 checkpoint_segments=None):
        super().__init__()
        embed = embed or hidden
        if tie_weights and embed != hidden:
            raise ValueError(f"tie_weights needs embed == hidden, got embed={embed}, hidden={hidden}")
        self.dropout = dropout
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab_size)
        for p in self.parameters():
            init.uniform_(p, -init_scale, init_scale)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.checkpoint_segments = checkpoint_segments

    checkpoint_unit = "time steps"      # what the chain's items are, for plan descriptions

    @property
    def checkpoint_segments(self):
        return self._checkpoint_segments

    @checkpoint_segments.setter
    def checkpoint_segments(self, segments):
        self._checkpoint_segments = check_setting(segments)
        self.lstm.checkpoint_segments = segments

    def forward(self, tokens, state=None):
        steps, batch = tokens.shape
        x = dropout(self.embedding(tokens), self.dropout, self.training)
        out, state = self.lstm(x, state)
        out = dropout(out, self.dropout, self.training)
        return self.decoder(out.reshape((steps * batch, out.shape[2]))), state

    def forward_loss(self, tokens, targets, state=None):
        """Mean cross-entropy over the T*B next-token predictions of the window -> (loss (), (h, c)).

        tokens, targets: int64 (T, B); state as for forward. Without checkpointing (checkpoint_segments
        None, or grad disabled as in evaluation, when nothing is kept for backward) this is exactly
        forward + F.cross_entropy. With it the loss is the sum of the segments' summed cross-entropies
        over T*B: the same value and gradients up to rounding, except that dropout draws its masks
        segment by segment (same distribution, other draws than forward's window-wide masks; the
        recomputation in backward replays them exactly).
        """
        if tokens.ndim != 2 or targets.shape != tokens.shape:
            raise ValueError(f"forward_loss expects tokens and targets of the same shape (T, B), got tokens "
                             f"{tokens.shape} and targets {targets.shape}")
        if self.checkpoint_segments is None or not is_grad_enabled():
            logits, state = self(tokens, state)
            return F.cross_entropy(logits, _flat(targets)), state
        return self._segmented_loss(tokens, targets, state, self.checkpoint_segments)

    def _segmented_loss(self, tokens, targets, state, segments, checkpointed=True):
        """forward_loss over the plan's time segments; checkpointed=False runs the same calls keeping everything
        (the reference the tests compare checkpointing against when dropout is on)."""
        steps, batch = tokens.shape
        plan = plan_for(steps, segments)
        if not checkpointed:
            plan = type(plan).kept([leaf.start for leaf in plan.leaves()] + [steps])
        draws_masks = self.training and (self.dropout > 0 or self.lstm.dropout > 0)  # the only RNG use

        def run(start, stop, carry, items):
            total, h, c = self._segment_loss(tokens[start:stop], targets[start:stop], *carry)
            return total, (h, c)

        sums, (h, c) = run_chain(plan, run, state if state is not None else (None, None),
                                 parameters=list(self.parameters()), preserve_rng_state=draws_masks)
        return stack(sums).sum() / (steps * batch), (h, c)

    def _segment_loss(self, tokens, targets, h, c):
        """Summed cross-entropy of one time segment from the carried (h, c) (None: zeros) -> (sum, h, c).

        The LSTM's own recurrent checkpointing is off in here: the segment already is the checkpoint,
        and nesting would recompute its steps twice.
        """
        with _recurrent_checkpointing_off(self.lstm):
            logits, (h, c) = self(tokens, None if h is None else (h, c))
        return F.cross_entropy(logits, _flat(targets), reduction="sum"), h, c

    # ---- pipeline blocks and their share of the carried state ------------------------------------
    def pipeline_blocks(self):
        """"embedding" (with its dropout), "lstm.l0" ... "lstm.l{L-1}" (one LSTM layer each, state (h, c) of
        (B, H)), "decoder" (dropout + decoder): composed, the model's forward bit for bit."""
        return ([("embedding", _EmbeddingBlock(self))]
                + [(f"lstm.l{k}", _LSTMLayerBlock(self.lstm, k)) for k in range(self.lstm.num_layers)]
                + [("decoder", _DecoderBlock(self))])

    def block_states(self, state):
        """The carried (h, c) as {block name: that block's state}: layer k's block gets (h[k], c[k])."""
        if state is None:
            return {}
        hs, cs = (unbind(t, 0) for t in state)
        return {f"lstm.l{k}": (h, c) for k, (h, c) in enumerate(zip(hs, cs))}

    def state_from_blocks(self, states):
        """block_states' inverse: every layer's (h, c) stacked to (L, B, H), or None when no block has one."""
        layers = [states.get(f"lstm.l{k}") for k in range(self.lstm.num_layers)]
        if all(s is None for s in layers):
            return None
        missing = [k for k, s in enumerate(layers) if s is None]
        if missing:
            raise ValueError(f"LSTMLanguageModel.state_from_blocks: no state for layers {missing}")
        return stack([h for h, _ in layers]), stack([c for _, c in layers])

    def extra_repr(self):
        return f"checkpoint_segments={self.checkpoint_segments!r}" if self.checkpoint_segments else ""


class _EmbeddingBlock(ModelPart):
    """The embedding and the dropout on its output: tokens (T, B) -> (T, B, E)."""

    def __init__(self, model):
        super().__init__(model, ["embedding"])

    def forward(self, tokens, state=None):
        return dropout(self.embedding(tokens), self.owner.dropout, self.training), None


class _LSTMLayerBlock(nn.Module):
    """Layer k of the LSTM: x (T, B, in) -> (T, B, H), state (h, c) each (B, H) (zeros when None).

    Holds only layer k's four Parameters (named `lstm.weight_ih_l{k}`, ...) and runs LSTM.forward_layer, so the
    LSTM's recurrent checkpointing setting applies; the LSTM's dropout follows every layer but the last, as in
    LSTM.forward.
    """

    state_batch_axis = 0

    def __init__(self, lstm, layer):
        super().__init__()
        self.add_module("lstm", ParameterSubset(lstm, [f"{w}_l{layer}" for w in
                                                       ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]))
        object.__setattr__(self, "whole", lstm)  # not registered: its other layers belong to other blocks
        object.__setattr__(self, "layer", layer)

    def forward(self, x, state=None):
        lstm = self.whole
        batch, hidden = x.shape[1], lstm.hidden_size
        if state is None:
            h = c = zeros(batch, hidden, dtype=x.dtype, device=x.device)
        else:
            h, c = state
            for t, name in ((h, "h"), (c, "c")):
                if t.shape != (batch, hidden):
                    raise ValueError(f"LSTM layer {self.layer} block: state {name} has shape {t.shape}, "
                                     f"expected {(batch, hidden)} (B, H)")
        out, h, c = lstm.forward_layer(self.layer, x, h, c)
        if lstm.dropout and self.training and self.layer < lstm.num_layers - 1:
            out = dropout(out, lstm.dropout, training=True)
        return out, (h, c)


class _DecoderBlock(ModelPart):
    """The dropout before the decoder, and the decoder: (T, B, H) -> logits (T*B, V)."""

    def __init__(self, model):
        super().__init__(model, ["decoder"])

    def forward(self, x, state=None):
        steps, batch, hidden = x.shape
        x = dropout(x, self.owner.dropout, self.training)
        return self.decoder(x.reshape((steps * batch, hidden))), None


def _flat(targets):
    """(T, B) -> (T*B,), the row order of forward's logits."""
    return targets.reshape((targets.shape[0] * targets.shape[1],))


@contextmanager
def _recurrent_checkpointing_off(lstm):
    segments = lstm.checkpoint_segments
    lstm.checkpoint_segments = None
    try:
        yield
    finally:
        lstm.checkpoint_segments = segments
