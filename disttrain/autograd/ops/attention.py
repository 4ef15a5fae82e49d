"""Attention: scaled dot-product attention (one fused op where it applies, else composed from matmuls and
the masked softmax), and the masked softmax itself: over the last axis with a mask (boolean keep or
additive) and/or causally."""
import math

from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function, OpError
from disttrain.autograd.ops.nn import Softmax, dropout
from disttrain.tensor import dtypes
from disttrain.tensor.tensor import Tensor


class MaskedSoftmax(Softmax):
    """softmax over the last axis of x (..., Tq, Tk) where masked-out entries get probability 0.

    mask (a constant, broadcast to x): boolean, True where a query may attend to a key, or
    floating-point, added to x (-inf removes an entry). causal: key j is kept for query i only
    where j <= i (the top-left aligned triangle of torch's is_causal). A row with
    every entry removed comes out all zeros (and passes no gradient) instead of NaN. Stable: the
    row maximum over the kept entries is subtracted before exp. Forward is one kernel
    (kernels_numpy.softmax_forward, causal or not) after the mask has set the removed scores to -inf
    or been added; backward is softmax's.
    """

    def forward(self, x, mask, causal):
        self.axis = -1
        if mask is not None:
            x = self.xp.where(mask, x, -self.xp.inf) if mask.dtype == bool else x + mask
        return self.backend.kernels.softmax_forward(self.xp, x, causal)


def masked_softmax(x, mask=None, causal=False):
    """Softmax over the last axis of x, leaving out masked entries (see MaskedSoftmax).

    mask: None, or a boolean (True = keep) or floating-point (additive) array or Tensor that
    broadcasts to x; it is a constant (no gradient). causal: also leave out keys after the query
    (x's last two axes are (queries, keys)).
    """
    if mask is not None:
        mask = mask.data if isinstance(mask, Tensor) else mask
        if mask.dtype != bool and not dtypes.is_floating(mask.dtype):
            raise TypeError(f"masked_softmax: mask must be boolean (True = keep) or floating-point (added to the "
                            f"scores), got dtype {mask.dtype}")
    if causal and x.ndim < 2:
        raise OpError(f"masked_softmax: causal needs (..., queries, keys) scores, got shape {x.shape}")
    return MaskedSoftmax.apply(x, mask, causal=causal)


class ScaledDotProductAttention(Function):
    """softmax(q k^T scale) v over the last two axes, causal or not: q (..., L, E), k (..., S, E), v (..., S, Ev)
    with the same leading axes. One kernel each way (kernels_numpy.attention_forward / attention_backward); what
    forward keeps for backward is the kernel table's: on the CPU each query's log-sum-exp, from which backward
    recomputes the (L, S) probabilities (O(L) per problem held, not O(L S)), on CUDA the probabilities."""

    saves_inputs = (0, 1, 2)
    saves_output = True

    def forward(self, q, k, v, scale, causal):
        self.scale, self.causal = scale, causal
        out, saved = self.backend.kernels.attention_forward(self.xp, q, k, v, scale, causal)
        self.saved_state = saved if self.recording else None
        return out

    def backward(self, g):
        q, k, v = self.saved_inputs
        if grad_mode.is_grad_enabled():  # create_graph: differentiable ops
            return _attention_grads(q, k, v, g, self.scale, self.causal)
        grads = self.backend.kernels.attention_backward(self.xp, g.data, q.data, k.data, v.data, self.output_data(),
                                                        self.saved_state, self.scale, self.causal)
        return tuple(Tensor._wrap(d) if self.needs_grad(i) else None for i, d in enumerate(grads))

    def release(self):
        super().release()
        self.saved_state = None


def _attention_grads(q, k, v, g, scale, causal):
    """(dq, dk, dv) of softmax(q k^T scale) v as differentiable ops (a gradient that is itself differentiated)."""
    p = masked_softmax((q @ k.swapaxes(-1, -2)) * scale, causal=causal)
    dp = g @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ g


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """torch.nn.functional.scaled_dot_product_attention: softmax(query key^T scale + mask) value, dropout on the
    probabilities. query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev); scale defaults to
    1 / sqrt(E); is_causal: query i sees keys j <= i (torch's top-left triangle); attn_mask: boolean (True =
    keep) or additive, broadcast to (..., L, S). Without a mask or dropout, and with the same leading axes,
    it is one fused op (ScaledDotProductAttention); otherwise matmuls around masked_softmax. Like torch's,
    dropout applies whenever dropout_p > 0: pass 0 outside training."""
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention: pass attn_mask or is_causal=True, not both "
                         "(is_causal is itself the mask)")
    if query.ndim < 2 or key.ndim < 2 or value.ndim < 2:
        raise OpError(f"scaled_dot_product_attention: query, key and value need (..., rows, features) shapes, "
                      f"got {query.shape}, {key.shape} and {value.shape}")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise OpError(f"scaled_dot_product_attention: query {query.shape}, key {key.shape} and value "
                      f"{value.shape} do not fit (..., L, E), (..., S, E) and (..., S, Ev)")
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if attn_mask is None and dropout_p == 0 and query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:
        return ScaledDotProductAttention.apply(query, key, value, scale=scale, causal=is_causal)
    weights = masked_softmax((query @ key.swapaxes(-1, -2)) * scale, attn_mask, causal=is_causal)
    return dropout(weights, dropout_p) @ value
