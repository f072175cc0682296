"""The ops' NumPy path, for float64 arrays: the same maths as the C kernels without their
rounding, which the gradient checks need. cnnx.ops validates, resolves the geometry and
sends float64 operands here; nothing here is tuned for speed.

Shapes: N batch, H x W input, C in channels, F filters, KH x KW kernel, OH x OW output (NHWC,
HWIO). Geometry arguments (oh, ow, top, left) come from cnnx.ops (a ConvGeometry's
output_size and pads for convolutions, ops._geometry for pooling).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _padded(x, top, left, oh, ow, kh, kw, strides, fill=0.0):
    """x padded so that every window of the output grid lies inside it."""
    n, h, w, c = x.shape
    need_h = (oh - 1) * strides[0] + kh
    need_w = (ow - 1) * strides[1] + kw
    bottom, right = max(need_h - h - top, 0), max(need_w - w - left, 0)
    if top == bottom == left == right == 0:
        return x
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)


def _windows(xp, kh, kw, strides, oh, ow):
    # (N, OH, OW, C, KH, KW) view of the padded input, one window per output pixel
    view = sliding_window_view(xp, (kh, kw), axis=(1, 2))
    return view[:, : (oh - 1) * strides[0] + 1 : strides[0], : (ow - 1) * strides[1] + 1 : strides[1]]


def conv2d_forward(x, kernel, bias, strides, relu, oh, ow, top, left):
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    xp = _padded(x, top, left, oh, ow, kh, kw, strides)
    cols = _windows(xp, kh, kw, strides, oh, ow).transpose(0, 1, 2, 4, 5, 3)
    # (N*OH*OW, KH*KW*C) @ (KH*KW*C, F) -> (N*OH*OW, F), already NHWC
    y = cols.reshape(n * oh * ow, kh * kw * c) @ kernel.reshape(kh * kw * c, f)
    if bias is not None:
        y += bias
    if relu:
        np.maximum(y, 0, out=y)
    return y.reshape(n, oh, ow, f).astype(x.dtype, copy=False)


def conv2d_backward(x, kernel, grad_output, strides, need_input_grad, oh, ow, top, left):
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    xp = _padded(x, top, left, oh, ow, kh, kw, strides)
    cols = _windows(xp, kh, kw, strides, oh, ow).transpose(0, 1, 2, 4, 5, 3)
    g = grad_output.reshape(n * oh * ow, f)
    # (KH*KW*C, N*OH*OW) @ (N*OH*OW, F) -> (KH*KW*C, F)
    grad_kernel = (cols.reshape(-1, kh * kw * c).T @ g).reshape(kernel.shape)
    grad_bias = g.sum(axis=0)
    grad_input = None
    if need_input_grad:
        # (N*OH*OW, F) @ (F, KH*KW*C) -> per-pixel column gradients, scattered back (col2im)
        grad_cols = (g @ kernel.reshape(-1, f).T).reshape(n, oh, ow, kh, kw, c)
        grad_xp = np.zeros(xp.shape, x.dtype)
        sh, sw = strides
        for i in range(kh):
            for j in range(kw):
                grad_xp[:, i : i + sh * oh : sh, j : j + sw * ow : sw] += grad_cols[:, :, :, i, j]
        grad_input = np.ascontiguousarray(grad_xp[:, top : top + h, left : left + w])
    return grad_input, grad_kernel.astype(x.dtype, copy=False), grad_bias.astype(x.dtype, copy=False)


def max_pool2d_forward(x, pool, strides, oh, ow, top, left):
    n, h, w, c = x.shape
    ph, pw = pool
    xp = _padded(x, top, left, oh, ow, ph, pw, strides, fill=-np.inf)
    windows = _windows(xp, ph, pw, strides, oh, ow).reshape(n, oh, ow, c, ph * pw)
    flat = windows.argmax(axis=-1)                                  # first max wins, like Keras
    y = np.take_along_axis(windows, flat[..., None], axis=-1)[..., 0]
    rows = np.arange(oh)[:, None, None] * strides[0] - top + flat // pw   # (N,OH,OW,C) broadcast
    cols = np.arange(ow)[None, :, None] * strides[1] - left + flat % pw
    return np.ascontiguousarray(y), (rows * w + cols).astype(np.int32)


def max_pool2d_backward(grad_output, argmax, input_shape):
    n, h, w, c = input_shape
    grad_input = np.zeros((n, h * w, c), grad_output.dtype)
    batch = np.arange(n)[:, None, None, None]
    channel = np.arange(c)[None, None, None, :]
    np.add.at(grad_input, (batch, argmax, channel), grad_output)
    return grad_input.reshape(n, h, w, c)


def _valid_counts(h, w, ph, pw, strides, oh, ow, top, left):
    # how many real (unpadded) cells each window covers: (OH, OW, 1)
    rows = np.arange(oh) * strides[0] - top
    cols = np.arange(ow) * strides[1] - left
    count_h = np.minimum(rows + ph, h) - np.maximum(rows, 0)
    count_w = np.minimum(cols + pw, w) - np.maximum(cols, 0)
    return (count_h[:, None] * count_w[None, :])[:, :, None]


def avg_pool2d_forward(x, pool, strides, oh, ow, top, left):
    n, h, w, c = x.shape
    ph, pw = pool
    xp = _padded(x, top, left, oh, ow, ph, pw, strides)
    sums = _windows(xp, ph, pw, strides, oh, ow).sum(axis=(-2, -1))
    counts = _valid_counts(h, w, ph, pw, strides, oh, ow, top, left)
    return (sums / counts).astype(x.dtype, copy=False)


def avg_pool2d_backward(grad_output, input_shape, pool, strides, oh, ow, top, left):
    n, h, w, c = input_shape
    ph, pw = pool
    counts = _valid_counts(h, w, ph, pw, strides, oh, ow, top, left)
    share = grad_output / counts
    need_h, need_w = (oh - 1) * strides[0] + ph, (ow - 1) * strides[1] + pw
    grad_xp = np.zeros((n, max(need_h, top + h), max(need_w, left + w), c), grad_output.dtype)
    sh, sw = strides
    for i in range(ph):
        for j in range(pw):
            grad_xp[:, i : i + sh * oh : sh, j : j + sw * ow : sw] += share
    return np.ascontiguousarray(grad_xp[:, top : top + h, left : left + w])


def dense_forward(x, kernel, bias, relu):
    y = x @ kernel                               # (N, I) @ (I, U)
    if bias is not None:
        y += bias
    if relu:
        np.maximum(y, 0, out=y)
    return y


def dense_backward(x, kernel, grad_output, need_input_grad):
    grad_kernel = x.T @ grad_output              # (I, N) @ (N, U) -> (I, U)
    grad_bias = grad_output.sum(axis=0)
    grad_input = grad_output @ kernel.T if need_input_grad else None
    return grad_input, grad_kernel, grad_bias
