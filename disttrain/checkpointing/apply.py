"""apply_activation_checkpointing: switch a model's activation checkpointing by one setting.

The setting is what a job's `[memory] activation_checkpointing` names: "none", "sqrt" or an
int (the number of segments).
"""
from disttrain.checkpointing.checkpoint import checkpoint_sequential, segment_bounds
from disttrain.nn.containers import Sequential


def apply_activation_checkpointing(model, setting):
    """Make `model` checkpoint its activations ("sqrt" or int segments) or stop doing so ("none" / None).

    - every module inside with a `checkpoint_segments` setting gets it (None for "none"): an
      nn.LSTM checkpoints its time steps recurrently; an LSTMLanguageModel checkpoints whole-model
      time segments in forward_loss (embedding -> LSTM -> decoder -> loss per segment);
    - a Sequential model (or, when the model is not one, its outermost Sequential submodules)
      runs its chain through checkpoint_sequential while training with grad enabled.
    Returns the model. Raises ValueError when the model has neither.
    """
    segments = None if setting in (None, "none") else setting
    if segments is not None:
        segment_bounds(1, segments)  # validates: "sqrt" or a positive int
    sequences = [m for m in model.modules() if hasattr(m, "checkpoint_segments")]
    for module in sequences:
        module.checkpoint_segments = segments
    chains = _outermost_sequentials(model)
    for chain in chains:
        if segments is None:
            chain.__dict__.pop("forward", None)
        else:
            object.__setattr__(chain, "forward", _CheckpointedForward(chain, segments))
    if not sequences and not chains:
        raise ValueError(f"apply_activation_checkpointing: {type(model).__name__} has no nn.LSTM, no "
                         "checkpoint_segments setting and no nn.Sequential to checkpoint")
    return model


class _CheckpointedForward:
    """Sequential.forward through checkpoint_sequential (plain forward in eval mode)."""

    def __init__(self, chain, segments):
        self.chain, self.segments = chain, segments

    def __call__(self, x):
        if not self.chain.training:
            return Sequential.forward(self.chain, x)
        return checkpoint_sequential(self.chain, self.segments, x)


def _outermost_sequentials(model):
    if isinstance(model, Sequential):
        return [model]
    found = []
    for child in model.children():
        found += _outermost_sequentials(child)
    return found
