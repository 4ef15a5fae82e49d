"""Activation checkpointing: the mechanism, the segment plans, and the planner that fits a step to a budget.

checkpoint (checkpoint.py): one call run without keeping its activations, rerun in backward.
Plans (plan.py): which segments of a chain (blocks, time steps) a step keeps and which it recomputes,
    from a setting ("sqrt", a count, an explicit or a binomial Plan); run_chain runs one, and every model
    family (nn.Sequential, nn.LSTM, the LSTM and Transformer LMs) runs its chain through it;
    checkpoint_sequential is run_chain over a list of modules.
apply_activation_checkpointing (apply.py): a model's setting, by one call.
The planner (planner.py): the plan with the least recomputation under a memory budget, from the costs that
    a probe (probe.py) measures in one step; fit_to_budget (auto.py) runs both and sets the plan on a model.
`memory` (MemoryMeter, enable, peak_bytes, reset_peak) counts live and peak array bytes.
"""
from disttrain.checkpointing.apply import apply_activation_checkpointing
from disttrain.checkpointing.checkpoint import checkpoint
from disttrain.checkpointing.plan import Plan, Segment, binomial_plan, checkpoint_sequential, plan_for, segment_bounds
from disttrain.tensor import memory
from disttrain.tensor.memory import MemoryMeter, peak_bytes, reset_peak
