"""Stateless NumPy-facing ops (NHWC, HWIO weights) that the layers call: arrays in, arrays out.

Shapes: N batch, H x W input, C in channels, F filters, KH x KW kernel, OH x OW output.
float32 arrays run on the C kernels (every operand must then be float32); float64 arrays
take the NumPy path of cnnx.ops_float64, which the gradient checks use (same maths, no
rounding noise). A layer works its convolution's geometry out once (conv_geometry, at
build) and passes it in: its calls then go straight to the kernels, which check the arrays
against it. Called without a geometry, the ops check their arguments and make one.
"""
import numpy as np

from cnnx import _kernels, _threads, ops_float64

PADDINGS = ("valid", "same")


def _pair(value, what):
    if type(value) is tuple and len(value) == 2 and type(value[0]) is type(value[1]) is int:
        if value[0] >= 1 and value[1] >= 1:
            return value                   # already a pair of positive ints: every call
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_padding(padding):
    if padding not in PADDINGS:
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")


def output_size(size, kernel, stride, padding):
    """Output length along one axis, by TensorFlow/Keras rules."""
    _check_padding(padding)
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1 if size >= kernel else 0


def padding_before(size, kernel, stride, padding):
    """Zeros added before the first element along one axis ('same' puts the odd one after)."""
    if padding == "valid":
        return 0
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0) // 2


def _geometry(h, w, kh, kw, strides, padding):
    sh, sw = strides
    oh, ow = output_size(h, kh, sh, padding), output_size(w, kw, sw, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} window with strides {strides} and padding "
                         f"{padding!r} does not fit a {h}x{w} input")
    return oh, ow, padding_before(h, kh, sh, padding), padding_before(w, kw, sw, padding)


def _check_nhwc(x, what):
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"{what} expects x of shape (N, H, W, C), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} expects float32 (or float64) arrays, got {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{what} got an empty input of shape {x.shape}")


def _check_operand(array, what, name, ndim, layout):
    """array must be a float32/float64 ndarray of ndim dimensions (layout names them)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what} expects {name} as a numpy.ndarray {layout}, got "
                        f"{type(array).__name__}; convert it with numpy.asarray(..., "
                        f"dtype=numpy.float32)")
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} expects {name} of dtype float32 (or float64), got "
                        f"{array.dtype}; convert it with {name}.astype(numpy.float32)")
    if array.ndim != ndim:
        raise ValueError(f"{what} expects {name} of shape {layout}, got {array.shape}")


def _c(array):
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------------------- convolution

def conv_geometry(input_size, kernel_size, filters, strides, padding):
    """A convolution's geometry, worked out and checked once (Conv2D.build does it when the
    layer is built): input_size (H, W, C), kernel_size (KH, KW) -> a _kernels.ConvGeometry
    with output_size (OH, OW) and pads (top, left) by Keras' rules."""
    h, w, c = input_size
    kh, kw = _pair(kernel_size, "kernel_size")
    strides = _pair(strides, "strides")
    oh, ow, top, left = _geometry(h, w, kh, kw, strides, padding)
    return _kernels.ConvGeometry((h, w, c), (kh, kw), int(filters), strides, (top, left),
                                 (oh, ow))


def _checked_conv_geometry(x, kernel, strides, padding, what):
    """The public ops' checks (a layer passes its geometry instead): x and kernel, then the
    geometry they and strides/padding make."""
    _check_nhwc(x, what)
    _check_operand(kernel, what, "kernel", 4, "(KH, KW, C, F)")
    kh, kw, c, f = kernel.shape
    if x.shape[3] != c:
        raise ValueError(f"{what}: x has {x.shape[3]} channels but the kernel "
                         f"{kernel.shape} expects {c}")
    return conv_geometry(x.shape[1:], (kh, kw), f, strides, padding)


def conv2d_forward(x, kernel, bias, strides=(1, 1), padding="valid", relu=False, n_threads=None,
                   out=None, geometry=None):
    """y = conv(x, kernel) + bias (ReLU if asked).  x (N,H,W,C), kernel (KH,KW,C,F) -> (N,OH,OW,F).

    out: optional float32 (N,OH,OW,F) array to write y into (a layer's reused buffer).
    geometry: the layer's conv_geometry (then strides and padding are not read, and the
    arrays are checked once, at the kernels' boundary)."""
    if geometry is None:
        geometry = _checked_conv_geometry(x, kernel, strides, padding, "conv2d_forward")
        kernel, bias = _c(kernel), None if bias is None else _c(bias)
    n_threads = _threads.resolve(n_threads)
    if x.dtype == np.float32:
        # one GEMM (N*OH*OW, KH*KW*C) @ (KH*KW*C, F) with im2col built panel by panel
        y = out if out is not None else np.empty(
            (len(x), *geometry.output_size, geometry.filters), np.float32)
        return _kernels.conv2d_forward(geometry, _c(x), kernel, bias, y, relu,
                                       n_threads=n_threads)
    return ops_float64.conv2d_forward(x, kernel, bias, geometry.strides, relu,
                                      *geometry.output_size, *geometry.pads)


def conv2d_backward(x, kernel, grad_output, strides=(1, 1), padding="valid",
                    need_input_grad=True, n_threads=None, out=None, geometry=None):
    """Gradients of conv2d_forward (without ReLU) -> (grad_input | None, grad_kernel, grad_bias).

    out: optional float32 array shaped like x to write grad_input into. geometry: as in
    conv2d_forward."""
    if geometry is None:
        geometry = _checked_conv_geometry(x, kernel, strides, padding, "conv2d_backward")
        _check_operand(grad_output, "conv2d_backward", "grad_output", 4, "(N, OH, OW, F)")
        expected = (len(x), *geometry.output_size, geometry.filters)
        if grad_output.shape != expected:
            raise ValueError(f"conv2d_backward: grad_output is {grad_output.shape}, "
                             f"expected {expected}")
        kernel = _c(kernel)
    n_threads = _threads.resolve(n_threads)
    if x.dtype == np.float32:
        x, grad_output = _c(x), _c(grad_output)
        grad_kernel = np.empty(kernel.shape, np.float32)
        grad_bias = np.empty(geometry.filters, np.float32)
        # (KH*KW*C, N*OH*OW) @ (N*OH*OW, F), summed over fixed pixel chunks
        _kernels.conv2d_grad_kernel(geometry, x, grad_output, grad_kernel, grad_bias,
                                    n_threads=n_threads)
        grad_input = None
        if need_input_grad:
            grad_input = out if out is not None else np.empty(x.shape, np.float32)
            if not _strided_grad_input(geometry, grad_output, kernel, grad_input, n_threads):
                _kernels.conv2d_grad_input(geometry, grad_output, kernel, grad_input,
                                           n_threads=n_threads)
        return grad_input, grad_kernel, grad_bias
    return ops_float64.conv2d_backward(x, kernel, grad_output, geometry.strides,
                                       need_input_grad, *geometry.output_size, *geometry.pads)


def _strided_grad_input(geometry, grad_output, kernel, grad_input, n_threads):
    """grad_input of a strided convolution as stride-1 convolutions, one per stride phase;
    False (nothing written) where that does not apply.

    The general path convolves grad_output dilated by the strides: with stride 2, three in
    four of the products it computes are zeros. Input cell iy takes only the kernel rows
    ky = (iy + pad_top) mod s + s·j, from output rows q - j (q = (iy + pad_top - ky0) / s): so
    the cells of one phase (iy ≡ ry - pad_top mod s) are a stride-1 convolution of
    grad_output with that phase's kernel rows and columns, flipped and transposed, which the
    stride-1 kernels run at full speed. Each cell is written by exactly one phase, in a
    fixed order: the same bits for any thread count."""
    (h, w, _), (kh, kw), (sh, sw) = geometry.input_size, geometry.kernel_size, geometry.strides
    if (sh, sw) == (1, 1):
        return False
    (top, left), (oh, ow), f = geometry.pads, geometry.output_size, geometry.filters
    phases = []
    for ry in range(sh):
        for rx in range(sw):
            first_y, first_x = -((ry - top) // sh), -((rx - left) // sw)    # ceil((top - ry) / sh)
            rows = (h - 1 + top - ry) // sh - first_y + 1
            columns = (w - 1 + left - rx) // sw - first_x + 1
            if rows < 1 or columns < 1:
                continue                                # no input cell in this phase
            taps_y, taps_x = len(range(ry, kh, sh)), len(range(rx, kw, sw))
            pads = (taps_y - 1 - first_y, taps_x - 1 - first_x)
            if taps_y and taps_x and min(pads) < 0:
                return False                            # a phase starts past its taps' reach
            phases.append((ry, rx, first_y, first_x, rows, columns, taps_y, taps_x, pads))
    for ry, rx, first_y, first_x, rows, columns, taps_y, taps_x, pads in phases:
        cells = grad_input[:, first_y * sh + ry - top::sh, first_x * sw + rx - left::sw]
        if not taps_y or not taps_x:                    # a kernel narrower than its stride
            cells[...] = 0.0
            continue
        # the last cells may lie past every output's window (their gradient is zero)
        reached_rows, reached_columns = min(rows, oh + pads[0]), min(columns, ow + pads[1])
        if (reached_rows, reached_columns) != (rows, columns):
            cells[...] = 0.0
            cells = cells[:, :reached_rows, :reached_columns]
        # (taps_y, taps_x, F, C): this phase's taps, flipped in space, channels transposed
        phase_kernel = np.ascontiguousarray(
            kernel[ry::sh, rx::sw][::-1, ::-1].transpose(0, 1, 3, 2))
        phase = _kernels.ConvGeometry((oh, ow, f), (taps_y, taps_x), kernel.shape[2], (1, 1),
                                      pads, (reached_rows, reached_columns))
        cells[...] = _kernels.conv2d_forward(
            phase, grad_output, phase_kernel, None,
            np.empty((len(grad_output), reached_rows, reached_columns, kernel.shape[2]),
                     np.float32), False, n_threads=n_threads)
    return True


def _fused_pool(geometry, pool_size, strides, padding):
    """(pool_size, pool output size) of a max-pool over the convolution's output, or None
    when conv2d_max_pool_forward cannot take it."""
    pool_size = _pair(pool_size, "pool_size")
    strides = _pair(strides if strides is not None else pool_size, "strides")
    oh, ow = geometry.output_size
    if strides != pool_size or output_size(oh, pool_size[0], strides[0], padding) < 1 \
            or output_size(ow, pool_size[1], strides[1], padding) < 1:
        return None
    pool_h, pool_w, top, left = _geometry(oh, ow, *pool_size, strides, padding)
    if (top, left) != (0, 0) or not _kernels.can_fuse_max_pool(geometry, pool_size,
                                                               (pool_h, pool_w)):
        return None
    return pool_size, (pool_h, pool_w)


def can_fuse_max_pool(geometry, pool_size, strides=None, padding="valid"):
    """True when conv2d_max_pool_forward takes the convolution of `geometry` followed by
    this max-pool: a stride-1 convolution (up to 8x8), windows that tile its output
    (strides == pool_size) from the top left, pool height dividing 16."""
    return _fused_pool(geometry, pool_size, strides, padding) is not None


def conv2d_max_pool_forward(x, kernel, bias, pool_size, pool_padding="valid", relu=False,
                            n_threads=None, out=None, geometry=None):
    """The convolution (its geometry: a layer's conv_geometry) then a max-pool of pool_size
    windows, strides pool_size -> (pooled (N,POH,POW,F), taps uint8): the bits of
    conv2d_forward then max_pool2d_forward with a uint8 argmax, without the convolution's
    output ever in memory (each band of it is pooled where it is made).  float32 only.
    out: optional (pooled, taps) arrays to write into."""
    what = "conv2d_max_pool_forward"
    fused = _fused_pool(geometry, pool_size, None, pool_padding)
    if fused is None:
        raise ValueError(f"{what}: a max-pool of {pool_size} ({pool_padding!r}) cannot be "
                         f"fused into {geometry!r} (see can_fuse_max_pool); run "
                         f"conv2d_forward then max_pool2d_forward")
    if x.dtype != np.float32:
        raise TypeError(f"{what} runs on float32 arrays, got x of {x.dtype}; the float64 "
                        f"path is conv2d_forward then max_pool2d_forward")
    pool_size, pool_out = fused
    shape = (len(x), *pool_out, geometry.filters)
    pooled, taps = out if out is not None else (np.empty(shape, np.float32),
                                                np.empty(shape, np.uint8))
    return _kernels.conv2d_max_pool_forward(geometry, _c(x), kernel, bias, pooled, taps,
                                            pool_size, relu,
                                            n_threads=_threads.resolve(n_threads))


# -------------------------------------------------------------------------------- pooling

def pool_geometry(input_size, pool_size, strides=None, padding="valid"):
    """A pooling layer's geometry, worked out and checked once (MaxPool2D / AvgPool2D.build):
    input_size (H, W, C) -> a _kernels.PoolGeometry with output_size (OH, OW) and pads
    (top, left) by Keras' rules; strides default to pool_size."""
    h, w, c = input_size
    ph, pw = _pair(pool_size, "pool_size")
    strides = _pair(strides if strides is not None else (ph, pw), "strides")
    oh, ow, top, left = _geometry(h, w, ph, pw, strides, padding)
    return _kernels.PoolGeometry((h, w, c), (ph, pw), strides, (top, left), (oh, ow))


def _pool_arguments(x_shape, pool_size, strides, padding, geometry):
    """((PH, PW), strides, OH, OW, top, left): from the layer's geometry, else worked out."""
    if geometry is not None:
        return (geometry.pool_size, geometry.strides, *geometry.output_size, *geometry.pads)
    ph, pw = _pair(pool_size, "pool_size")
    strides = _pair(strides if strides is not None else (ph, pw), "strides")
    return ((ph, pw), strides, *_geometry(x_shape[1], x_shape[2], ph, pw, strides, padding))


def max_pool2d_forward(x, pool_size=None, strides=None, padding="valid", n_threads=None,
                       out=None, geometry=None):
    """y = max over each window -> (y, argmax); argmax is the int32 index h*W+w in the input plane.

    out: optional (y, argmax) arrays to write into (float32 only; a layer's buffers reused
    from step to step, which saves the page faults of fresh big arrays).
    geometry: the layer's pool_geometry (then pool_size, strides and padding are not read,
    and the arrays are checked once, at the kernels' boundary)."""
    n_threads = _threads.resolve(n_threads)
    if geometry is not None and out is not None and x.dtype == np.float32:
        return _kernels.max_pool2d_forward(_c(x), *out, n_threads=n_threads, geometry=geometry)
    _check_nhwc(x, "max_pool2d_forward")
    n, h, w, c = x.shape
    (ph, pw), strides, oh, ow, top, left = _pool_arguments(x.shape, pool_size, strides,
                                                           padding, geometry)
    if x.dtype == np.float32:
        y, argmax = out if out is not None else (np.empty((n, oh, ow, c), np.float32),
                                                 np.empty((n, oh, ow, c), np.int32))
        return _kernels.max_pool2d_forward(_c(x), y, argmax, (ph, pw), strides, (top, left),
                                           n_threads=n_threads)
    return ops_float64.max_pool2d_forward(x, (ph, pw), strides, oh, ow, top, left)


def max_pool2d_backward(grad_output, argmax, input_shape, n_threads=None, pool_size=None,
                        strides=None, padding="valid", out=None, relu_y=None, geometry=None):
    """Route each output gradient to the input cell that held the max.

    pool_size, strides and padding, when given, must be the forward's: windows that tile the
    input (strides == pool_size) then take one write pass instead of zeroing and a scatter.
    out: optional float32 array of input_shape to write grad_input into.
    relu_y: the forward's output, when the pool's input is a ReLU's output: ReLU's backward
    is then folded in (each routed gradient times (y > 0), the bits of ReLU's backward after
    this one).
    geometry: the layer's pool_geometry, in place of pool_size, strides and padding."""
    n, h, w, c = input_shape
    if (geometry is not None and out is not None and grad_output.dtype == np.float32
            and (relu_y is None or relu_y.dtype == np.float32)):
        return _kernels.max_pool2d_backward(_c(grad_output), _c(argmax), out,
                                            relu_y=None if relu_y is None else _c(relu_y),
                                            n_threads=_threads.resolve(n_threads),
                                            geometry=geometry)
    if argmax.shape != grad_output.shape:
        raise ValueError(f"max_pool2d_backward: argmax {argmax.shape} and grad_output "
                         f"{grad_output.shape} differ")
    n_threads = _threads.resolve(n_threads)
    if relu_y is not None and relu_y.shape != grad_output.shape:
        raise ValueError(f"max_pool2d_backward: relu_y {relu_y.shape} and grad_output "
                         f"{grad_output.shape} differ")
    if grad_output.dtype == np.float32:
        grad_input = out if out is not None else np.empty((n, h, w, c), np.float32)
        windows = {}                              # unknown: the kernel scatters by argmax
        if geometry is not None or pool_size is not None:
            pool_size, strides, _, _, top, left = _pool_arguments(input_shape, pool_size,
                                                                  strides, padding, geometry)
            windows = dict(pool_size=pool_size, strides=strides, pads=(top, left))
        return _kernels.max_pool2d_backward(
            _c(grad_output), _c(argmax), grad_input, n_threads=n_threads,
            relu_y=None if relu_y is None else _c(relu_y.astype(np.float32, copy=False)),
            **windows)
    grad_input = ops_float64.max_pool2d_backward(grad_output, argmax, input_shape)
    if relu_y is not None:
        # ReLU's backward at the max cells (the others hold 0): a cell that is the max of
        # several windows is multiplied by the same 1 or 0 for each, s * k * k == s * k
        cells = grad_input.reshape(n, h * w, c)
        batch, channel = np.arange(n)[:, None, None, None], np.arange(c)[None, None, None, :]
        cells[batch, argmax, channel] *= relu_y > 0
    return grad_input


def avg_pool2d_forward(x, pool_size=None, strides=None, padding="valid", n_threads=None,
                       out=None, geometry=None):
    """y = mean over each window's real cells (padding is not counted, as in Keras).
    out: optional float32 array to write y into; geometry: as in max_pool2d_forward."""
    n_threads = _threads.resolve(n_threads)
    if geometry is not None and out is not None and x.dtype == np.float32:
        return _kernels.avg_pool2d_forward(_c(x), out, n_threads=n_threads, geometry=geometry)
    _check_nhwc(x, "avg_pool2d_forward")
    n, h, w, c = x.shape
    (ph, pw), strides, oh, ow, top, left = _pool_arguments(x.shape, pool_size, strides,
                                                           padding, geometry)
    if x.dtype == np.float32:
        y = out if out is not None else np.empty((n, oh, ow, c), np.float32)
        return _kernels.avg_pool2d_forward(_c(x), y, (ph, pw), strides, (top, left),
                                           n_threads=n_threads)
    return ops_float64.avg_pool2d_forward(x, (ph, pw), strides, oh, ow, top, left)


def avg_pool2d_backward(grad_output, input_shape, pool_size=None, strides=None,
                        padding="valid", n_threads=None, out=None, geometry=None):
    """Spread each output gradient evenly over its window's real cells.
    out: optional float32 array of input_shape to write into; geometry: as in
    max_pool2d_forward."""
    n_threads = _threads.resolve(n_threads)
    if geometry is not None and out is not None and grad_output.dtype == np.float32:
        return _kernels.avg_pool2d_backward(_c(grad_output), out, n_threads=n_threads,
                                            geometry=geometry)
    n, h, w, c = input_shape
    (ph, pw), strides, oh, ow, top, left = _pool_arguments(input_shape, pool_size, strides,
                                                           padding, geometry)
    if grad_output.shape != (n, oh, ow, c):
        raise ValueError(f"avg_pool2d_backward: grad_output is {grad_output.shape}, "
                         f"expected {(n, oh, ow, c)}")
    if grad_output.dtype == np.float32:
        grad_input = out if out is not None else np.empty((n, h, w, c), np.float32)
        return _kernels.avg_pool2d_backward(_c(grad_output), grad_input, (ph, pw), strides,
                                            (top, left), n_threads=n_threads)
    return ops_float64.avg_pool2d_backward(grad_output, input_shape, (ph, pw), strides, oh, ow,
                                           top, left)


# ---------------------------------------------------------------------------------- dense

def dense_forward(x, kernel, bias, relu=False, n_threads=None):
    """y = x @ kernel + bias (ReLU if asked).  x (N,I), kernel (I,U) -> (N,U)."""
    _check_operand(x, "dense_forward", "x", 2, "(N, I)")
    _check_operand(kernel, "dense_forward", "kernel", 2, "(I, U)")
    if x.shape[1] != kernel.shape[0]:
        raise ValueError(f"dense_forward: x is {x.shape} but the kernel is {kernel.shape}")
    n_threads = _threads.resolve(n_threads)
    if x.dtype == np.float32:
        y = np.empty((x.shape[0], kernel.shape[1]), np.float32)   # (N, I) @ (I, U)
        return _kernels.sgemm(_c(x), _c(kernel), y, None if bias is None else _c(bias), relu,
                              n_threads=n_threads)
    return ops_float64.dense_forward(x, kernel, bias, relu)


def dense_backward(x, kernel, grad_output, need_input_grad=True, n_threads=None):
    """Gradients of dense_forward (without ReLU) -> (grad_input | None, grad_kernel, grad_bias)."""
    _check_operand(x, "dense_backward", "x", 2, "(N, I)")
    _check_operand(kernel, "dense_backward", "kernel", 2, "(I, U)")
    _check_operand(grad_output, "dense_backward", "grad_output", 2, "(N, U)")
    if grad_output.shape != (x.shape[0], kernel.shape[1]):
        raise ValueError(f"dense_backward: grad_output is {grad_output.shape}, expected "
                         f"{(x.shape[0], kernel.shape[1])}")
    n_threads = _threads.resolve(n_threads)
    if x.dtype == np.float32:
        x, kernel, grad_output = _c(x), _c(kernel), _c(grad_output)
        grad_kernel = np.empty(kernel.shape, np.float32)        # (I, N) @ (N, U)
        _kernels.sgemm(x, grad_output, grad_kernel, transpose_a=True, n_threads=n_threads)
        grad_bias = _kernels.column_sums(grad_output, np.empty(kernel.shape[1], np.float32),
                                         n_threads=n_threads)
        grad_input = None
        if need_input_grad:
            grad_input = np.empty(x.shape, np.float32)          # (N, U) @ (U, I)
            _kernels.sgemm(grad_output, kernel, grad_input, transpose_b=True,
                           n_threads=n_threads)
        return grad_input, grad_kernel, grad_bias
    return ops_float64.dense_backward(x, kernel, grad_output, need_input_grad)
