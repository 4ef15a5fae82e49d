"""Attention's softmax: over the last axis with a mask (boolean keep or additive) and/or causally."""
from disttrain.autograd.ops.nn import Softmax
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
        raise ValueError(f"masked_softmax: causal needs (..., queries, keys) scores, got shape {x.shape}")
    return MaskedSoftmax.apply(x, mask, causal=causal)
