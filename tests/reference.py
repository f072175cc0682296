"""Naive references for the kernels: plain loops in float64, slow and obviously right.

N batch, H x W input, C in channels, F filters, KH x KW kernel, OH x OW output (NHWC, HWIO).
Padding follows TensorFlow: out = ceil(in / stride) for 'same', pad_before = pad_total // 2.
"""
import math

import numpy as np


def geometry(size, kernel, stride, padding):
    """(output size, zeros before) along one axis."""
    if padding == "same":
        out = math.ceil(size / stride)
        return out, max((out - 1) * stride + kernel - size, 0) // 2
    return (size - kernel) // stride + 1, 0


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def sgemm(a, b, bias=None, relu=False):
    m, k = a.shape
    n = b.shape[1]
    c = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            total = 0.0
            for p in range(k):
                total += float(a[i, p]) * float(b[p, j])
            c[i, j] = total
    if bias is not None:
        c += bias
    return np.maximum(c, 0) if relu else c


def conv2d(x, kernel, bias, strides, padding, relu=False):
    sh, sw = _pair(strides)
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    oh, top = geometry(h, kh, sh, padding)
    ow, left = geometry(w, kw, sw, padding)
    y = np.zeros((n, oh, ow, f))
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for di in range(kh):
                    for dj in range(kw):
                        row, col = i * sh + di - top, j * sw + dj - left
                        if 0 <= row < h and 0 <= col < w:
                            y[b, i, j] += x[b, row, col].astype(np.float64) @ kernel[di, dj]
    if bias is not None:
        y += bias
    return np.maximum(y, 0) if relu else y


def conv2d_backward(x, kernel, grad_output, strides, padding):
    """(grad_input, grad_kernel, grad_bias) of conv2d without ReLU, by the chain rule."""
    sh, sw = _pair(strides)
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    oh, top = geometry(h, kh, sh, padding)
    ow, left = geometry(w, kw, sw, padding)
    grad_input = np.zeros(x.shape)
    grad_kernel = np.zeros(kernel.shape)
    g = grad_output.astype(np.float64)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for di in range(kh):
                    for dj in range(kw):
                        row, col = i * sh + di - top, j * sw + dj - left
                        if 0 <= row < h and 0 <= col < w:
                            grad_input[b, row, col] += kernel[di, dj] @ g[b, i, j]
                            grad_kernel[di, dj] += np.outer(x[b, row, col], g[b, i, j])
    return grad_input, grad_kernel, g.sum(axis=(0, 1, 2))


def _windows(h, w, pool, strides, padding):
    ph, pw = _pair(pool)
    sh, sw = _pair(strides)
    oh, top = geometry(h, ph, sh, padding)
    ow, left = geometry(w, pw, sw, padding)
    for i in range(oh):
        for j in range(ow):
            cells = [(r, q) for r in range(i * sh - top, i * sh - top + ph)
                     for q in range(j * sw - left, j * sw - left + pw) if 0 <= r < h and 0 <= q < w]
            yield i, j, cells


def max_pool2d(x, pool, strides, padding):
    """(y, argmax): argmax is the flat index r*W + q of the first maximum (row-major)."""
    n, h, w, c = x.shape
    ph, pw = _pair(pool)
    oh = geometry(h, ph, _pair(strides)[0], padding)[0]
    ow = geometry(w, pw, _pair(strides)[1], padding)[0]
    y = np.zeros((n, oh, ow, c), x.dtype)
    argmax = np.zeros((n, oh, ow, c), np.int32)
    for b in range(n):
        for i, j, cells in _windows(h, w, pool, strides, padding):
            for ch in range(c):
                best = max(range(len(cells)), key=lambda t: (x[b, cells[t][0], cells[t][1], ch], -t))
                r, q = cells[best]
                y[b, i, j, ch], argmax[b, i, j, ch] = x[b, r, q, ch], r * w + q
    return y, argmax


def max_pool2d_backward(grad_output, argmax, input_shape):
    n, h, w, c = input_shape
    grad_input = np.zeros((n, h * w, c))
    for b, i, j, ch in np.ndindex(*grad_output.shape):
        grad_input[b, argmax[b, i, j, ch], ch] += grad_output[b, i, j, ch]
    return grad_input.reshape(input_shape)


def avg_pool2d(x, pool, strides, padding):
    n, h, w, c = x.shape
    ph, pw = _pair(pool)
    oh = geometry(h, ph, _pair(strides)[0], padding)[0]
    ow = geometry(w, pw, _pair(strides)[1], padding)[0]
    y = np.zeros((n, oh, ow, c))
    for i, j, cells in _windows(h, w, pool, strides, padding):
        y[:, i, j] = np.mean([x[:, r, q].astype(np.float64) for r, q in cells], axis=0)
    return y


def avg_pool2d_backward(grad_output, input_shape, pool, strides, padding):
    n, h, w, c = input_shape
    grad_input = np.zeros(input_shape)
    for i, j, cells in _windows(h, w, pool, strides, padding):
        for r, q in cells:
            grad_input[:, r, q] += grad_output[:, i, j] / len(cells)
    return grad_input


def dense_backward(x, kernel, grad_output):
    x, kernel, g = (a.astype(np.float64) for a in (x, kernel, grad_output))
    return g @ kernel.T, x.T @ g, g.sum(axis=0)


def numerical_gradient(f, array, indices, epsilon=1e-6):
    """Central differences of the scalar f() with respect to array.flat[i], i in indices."""
    grads = []
    for i in indices:
        original = array.flat[i]
        array.flat[i] = original + epsilon
        plus = f()
        array.flat[i] = original - epsilon
        minus = f()
        array.flat[i] = original
        grads.append((plus - minus) / (2 * epsilon))
    return np.array(grads)


def step_results(model, x, y):
    """Everything one training step and a prediction produce, copied: what a fused model
    must reproduce bit for bit from the same layers taken apart."""
    total = model.gradient(x, y, key=(0, 3, 0))
    outputs = model.forward(x, training=True, rng=np.random.default_rng(1)).copy()
    model.apply_gradient_sum(total)
    return ({**total.grads, **total.state}, total.loss_sum, outputs, model.predict(x),
            model.get_weights())


def bits(array):
    """The bits of a float array, to compare -0 and +0, and NaNs, exactly."""
    array = np.asarray(array)
    return array.view(np.uint32 if array.dtype == np.float32 else np.uint64)


def assert_same_step(got, expected, who):
    """Two step_results, bit for bit."""
    grads, loss, outputs, predictions, weights = got
    assert loss == expected[1], who
    for key, value in expected[0].items():
        assert np.array_equal(bits(grads[key]), bits(value)), (key, who)
    assert np.array_equal(bits(outputs), bits(expected[2])), who
    np.testing.assert_array_equal(predictions, expected[3])
    for key, value in expected[4].items():
        assert np.array_equal(bits(weights[key]), bits(value)), (key, who)
