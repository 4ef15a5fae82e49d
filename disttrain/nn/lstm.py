"""Multi-layer LSTM over (T, B, C) sequences, one fused layer node per layer (or checkpointed segment)."""
import math

from disttrain.autograd.function import OpError
from disttrain.autograd.grad_mode import is_grad_enabled
from disttrain.autograd.ops import concat, dropout, lstm_layer, stack, unbind
from disttrain.checkpointing.plan import SegmentsSetting, plan_for, run_chain
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.tensor.creation import uniform, zeros


class LSTM(Module):
    """LSTM(input_size, hidden_size, num_layers=1, dropout=0.0).

    forward(x (T, B, input_size), hx=None) -> (output (T, B, H), (h_n, c_n) each (num_layers, B, H)).
    hx=None starts from zeros; truncated BPTT passes the detached (h_n, c_n) of the last segment.

    Parameters per layer k, with PyTorch's names and layouts (gate order i, f, g, o), so
    state_dicts load into torch.nn.LSTM unchanged:
        weight_ih_l{k} (4H, in_k)   weight_hh_l{k} (4H, H)   bias_ih_l{k} (4H,)   bias_hh_l{k} (4H,)
    Each layer is one fused LSTMLayer node (disttrain.autograd.ops.lstm): the input projection of
    all T steps is one GEMM, the T steps run in the backend's kernels. `dropout` applies to the
    outputs of every layer but the last (Zaremba et al.'s non-recurrent dropout).

    checkpoint_segments (None, "sqrt", an int or a Plan over the T steps; an attribute that may be
    changed at any time): recurrent activation checkpointing. Each layer's T steps run as the segments
    of disttrain.checkpointing.plan.plan_for (for "sqrt": round(sqrt(T)) segments, all but the last
    recomputed), so only the carried (h, c) at the boundaries of recomputed segments is kept and backward
    recomputes their gates and cell states, holding O(sqrt(T)) instead of O(T) per-step activations.
    The layer inputs and outputs (T, B, *) are kept either way.
    """

    checkpoint_segments = SegmentsSetting()
    checkpoint_unit = "time steps"           # what the chain's items are, for plan descriptions

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, checkpoint_segments=None):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"LSTM dropout must be in [0, 1), got {dropout}")
        try:
            self.checkpoint_segments = checkpoint_segments
        except ValueError as exc:
            raise ValueError(f"LSTM checkpoint_segments: {exc}") from None
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        bound = 1 / math.sqrt(hidden_size)  # PyTorch's default init
        for k in range(num_layers):
            fan_in = input_size if k == 0 else hidden_size
            for name, shape in ((f"weight_ih_l{k}", (4 * hidden_size, fan_in)),
                                (f"weight_hh_l{k}", (4 * hidden_size, hidden_size)),
                                (f"bias_ih_l{k}", (4 * hidden_size,)), (f"bias_hh_l{k}", (4 * hidden_size,))):
                setattr(self, name, Parameter(uniform(shape, -bound, bound)))

    def forward(self, x, hx=None):
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise OpError(f"LSTM expects input (T, B, {self.input_size}), got {x.shape}")
        steps, batch, _ = x.shape
        if hx is None:
            zero = zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
            h0 = c0 = (zero,) * self.num_layers
        else:
            h0, c0 = (self._check_state(s, batch, name) for s, name in zip(hx, ("h", "c")))
        layer_input, h_n, c_n = x, [], []
        for k in range(self.num_layers):
            layer_input, h, c = self.forward_layer(k, layer_input, h0[k], c0[k])
            h_n.append(h)
            c_n.append(c)
            if self.dropout and self.training and k < self.num_layers - 1:
                layer_input = dropout(layer_input, self.dropout, training=True)
        return layer_input, (stack(h_n), stack(c_n))

    def forward_layer(self, k, x, h, c):
        """Layer k alone: x (T, B, in_k), h, c (B, H) -> (output (T, B, H), h, c); no dropout (forward adds it
        between layers). Pipeline blocks run one layer each through this."""
        weights = tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        if (self.checkpoint_segments is None or not is_grad_enabled()
                or not any(t.requires_grad for t in (x, h, c) + weights)):
            return lstm_layer(x, h, c, *weights)
        xs = unbind(x.reshape((x.shape[0], 1) + x.shape[1:]), 0)  # T steps of (1, B, in): one node, views

        def run(start, stop, carry, steps):
            out, h, c = lstm_layer(concat(steps, 0), *carry, *weights)
            return out, (h, c)

        outputs, (h, c) = run_chain(plan_for(x.shape[0], self.checkpoint_segments), run, (h, c), item_inputs=xs,
                                    parameters=weights)
        return concat(outputs, 0), h, c

    def _check_state(self, state, batch, name):
        expected = (self.num_layers, batch, self.hidden_size)
        if state.shape != expected:
            raise OpError(f"LSTM initial {name} has shape {state.shape}, expected {expected} (num_layers, B, H)")
        return unbind(state, 0)

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
                + (f", dropout={self.dropout}" if self.dropout else "")
                + (f", checkpoint_segments={self.checkpoint_segments!r}" if self.checkpoint_segments else ""))
