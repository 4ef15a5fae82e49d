"""apply_activation_checkpointing: switch a model's activation checkpointing by one setting.

The setting is what a job's `[memory] activation_checkpointing` names ("none", "sqrt", a segment count) or
a Plan (disttrain.checkpointing.plan). Model families read it from their public `checkpoint_segments`
attribute: nn.Sequential (its chain of modules), nn.LSTM (time steps of each layer), the LSTM LM (time
segments of its loss) and the Transformer LM (its blocks).
"""
from disttrain.checkpointing.plan import check_setting


def apply_activation_checkpointing(model, setting):
    """Set `checkpoint_segments` on the outermost modules of `model` that have one (the model itself, or e.g.
    an nn.Sequential or nn.LSTM inside it; a module with the setting is responsible for what it holds).

    setting: "none" / None (off), "sqrt", a positive int or a Plan. Returns the model. Raises ValueError for
    a bad setting or a model with no such module.
    """
    segments = None if setting in (None, "none") else check_setting(setting)
    owners = checkpointed_modules(model)
    if not owners:
        raise ValueError(f"apply_activation_checkpointing: {type(model).__name__} has no nn.LSTM, no "
                         "checkpoint_segments setting and no nn.Sequential to checkpoint")
    for module in owners:
        module.checkpoint_segments = segments
    return model


def checkpointed_modules(module):
    """The outermost modules in `module` (itself included) with a `checkpoint_segments` setting."""
    if hasattr(type(module), "checkpoint_segments") or "checkpoint_segments" in vars(module):
        return [module]
    return [found for child in module.children() for found in checkpointed_modules(child)]
