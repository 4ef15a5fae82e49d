"""Activation checkpointing and the memory meter that measures it.

checkpoint / checkpoint_sequential trade recomputation for activation memory (Chen et al.
2016); nn.LSTM(checkpoint_segments=...) does the same over time steps;
apply_activation_checkpointing switches a model by one setting; `memory` (MemoryMeter,
enable, peak_bytes, reset_peak) counts live and peak array bytes.
"""
from disttrain.checkpointing.apply import apply_activation_checkpointing
from disttrain.checkpointing.checkpoint import checkpoint, checkpoint_sequential, segment_bounds
from disttrain.tensor import memory
from disttrain.tensor.memory import MemoryMeter, peak_bytes, reset_peak
