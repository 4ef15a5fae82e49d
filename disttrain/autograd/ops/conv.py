"""Convolution and pooling through im2col.

Unfold (im2col) copies each receptive field into a column using a strided view of the padded
input, with no Python loop over pixels; Fold (col2im) is its adjoint and loops only over the
kh*kw kernel offsets. Each is the other's backward, so conv2d = W @ unfold(x) and the pools
(a max or mean over unfolded windows) are differentiable to any order.
"""
from disttrain.autograd.function import Function, OpError


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


class Unfold(Function):
    """(N, C, H, W) -> (N, C*kh*kw, OH*OW); padding is filled with `pad_value`."""

    is_view = True  # a 1x1 kernel with stride 1 and no padding gives a view of x

    def forward(self, x, kernel, stride, padding, pad_value=0.0):
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {x.shape}")
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        n, c, h, w = x.shape
        oh, ow = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"kernel {kernel} with padding {padding} does not fit input {h}x{w}")
        self.geometry = (x.shape, kernel, stride, padding)
        if ph or pw:
            x = self.xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
        s = x.strides
        windows = self.backend.as_strided(x, (n, c, kh, kw, oh, ow), (s[0], s[1], s[2], s[3], s[2] * sh, s[3] * sw))
        return windows.reshape(n, c * kh * kw, oh * ow)

    def backward(self, g):
        shape, kernel, stride, padding = self.geometry
        return Fold.apply(g, in_shape=shape, kernel=kernel, stride=stride, padding=padding)


class Fold(Function):
    """The adjoint of Unfold: sum columns back into an (N, C, H, W) image."""

    def forward(self, cols, in_shape, kernel, stride, padding):
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        n, c, h, w = in_shape
        oh, ow = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
        self.geometry = (kernel, stride, padding)
        out = self.xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
        cols = cols.reshape(n, c, kh, kw, oh, ow)
        for i in range(kh):
            for j in range(kw):
                out[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += cols[:, :, i, j]
        return out[:, :, ph:ph + h, pw:pw + w]

    def backward(self, g):
        kernel, stride, padding = self.geometry
        return Unfold.apply(g, kernel=kernel, stride=stride, padding=padding)


def unfold(x, kernel_size, stride=1, padding=0, pad_value=0.0):
    return Unfold.apply(x, kernel=_pair(kernel_size), stride=_pair(stride), padding=_pair(padding),
                        pad_value=pad_value)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """x (N, C, H, W), weight (O, C, kh, kw), bias (O,) -> (N, O, OH, OW)."""
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise OpError(f"conv2d: input {x.shape} and weight {weight.shape} do not match "
                      "(expected (N, C, H, W) and (O, C, kh, kw))")
    n, _, h, w = x.shape
    o, c, kh, kw = weight.shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    cols = unfold(x, (kh, kw), (sh, sw), (ph, pw))                  # (N, C*kh*kw, L)
    out = weight.reshape((o, c * kh * kw)) @ cols                   # (N, O, L)
    if bias is not None:
        out = out + bias.reshape((1, o, 1))
    return out.reshape((n, o, out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)))


def _pool(x, kernel_size, stride, padding, pad_value):
    n, c, h, w = x.shape
    (kh, kw) = _pair(kernel_size)
    (sh, sw) = _pair(stride if stride is not None else kernel_size)
    (ph, pw) = _pair(padding)
    cols = unfold(x, (kh, kw), (sh, sw), (ph, pw), pad_value)       # (N, C*kh*kw, L)
    windows = cols.reshape((n, c, kh * kw, -1))
    return windows, (n, c, out_size(h, kh, sh, ph), out_size(w, kw, sw, pw))


def max_pool2d(x, kernel_size, stride=None, padding=0):
    windows, out_shape = _pool(x, kernel_size, stride, padding, float("-inf"))
    return windows.amax(axis=2).reshape(out_shape)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average over each window, zero padding included in the count (PyTorch's default)."""
    windows, out_shape = _pool(x, kernel_size, stride, padding, 0.0)
    return windows.mean(axis=2).reshape(out_shape)
