"""Pooling and dense kernels against the naive loops; thread-count independence; errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnx
from cnnx import _kernels, ops

import reference

POOLS = [  # (x shape, pool, strides, padding)
    ((1, 1, 1, 1), 1, 1, "valid"),
    ((2, 6, 5, 3), 2, 2, "valid"),
    ((2, 7, 6, 3), 3, 2, "same"),
    ((1, 5, 7, 17), (2, 3), (1, 2), "same"),
    ((2, 9, 8, 2), 3, 1, "valid"),
]
POOL_IDS = [f"{'x'.join(map(str, p[0]))}-p{p[1]}-s{p[2]}-{p[3]}" for p in POOLS]


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("x_shape, pool, strides, padding", POOLS, ids=POOL_IDS)
def test_max_pool2d_matches_reference(x_shape, pool, strides, padding, rng):
    x = f32(rng, x_shape)
    y, argmax = ops.max_pool2d_forward(x, pool, strides, padding, n_threads=2)
    expected_y, expected_argmax = reference.max_pool2d(x, pool, strides, padding)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)
    grad_output = f32(rng, y.shape)
    grad_input = ops.max_pool2d_backward(grad_output, argmax, x.shape, n_threads=2)
    np.testing.assert_allclose(grad_input,
                               reference.max_pool2d_backward(grad_output, argmax, x.shape),
                               rtol=1e-6, atol=1e-6)


def test_max_pool2d_takes_the_first_of_tied_maxima():
    x = np.zeros((1, 4, 4, 2), np.float32)
    y, argmax = ops.max_pool2d_forward(x, 2, 2, "valid")
    np.testing.assert_array_equal(argmax[0, :, :, 0], [[0, 2], [8, 10]])


@pytest.mark.parametrize("x_shape, pool, strides, padding", POOLS, ids=POOL_IDS)
def test_avg_pool2d_matches_reference(x_shape, pool, strides, padding, rng):
    x = f32(rng, x_shape)
    y = ops.avg_pool2d_forward(x, pool, strides, padding, n_threads=2)
    np.testing.assert_allclose(y, reference.avg_pool2d(x, pool, strides, padding),
                               rtol=1e-5, atol=1e-6)
    grad_output = f32(rng, y.shape)
    grad_input = ops.avg_pool2d_backward(grad_output, x.shape, pool, strides, padding,
                                         n_threads=2)
    np.testing.assert_allclose(
        grad_input, reference.avg_pool2d_backward(grad_output, x.shape, pool, strides, padding),
        rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 4), ph=st.integers(1, 4),
       pw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       padding=st.sampled_from(["valid", "same"]), seed=st.integers(0, 2**16))
def test_pooling_random_geometry(h, w, c, ph, pw, sh, sw, padding, seed):
    if padding == "valid" and (ph > h or pw > w):
        return
    rng = np.random.default_rng(seed)
    x = f32(rng, (2, h, w, c))
    y, argmax = ops.max_pool2d_forward(x, (ph, pw), (sh, sw), padding)
    expected_y, expected_argmax = reference.max_pool2d(x, (ph, pw), (sh, sw), padding)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)
    max_grad_output = f32(rng, y.shape)
    np.testing.assert_allclose(          # overlapping windows: float32 sums vs float64 sums
        ops.max_pool2d_backward(max_grad_output, argmax, x.shape),
        reference.max_pool2d_backward(max_grad_output, expected_argmax, x.shape),
        rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ops.avg_pool2d_forward(x, (ph, pw), (sh, sw), padding),
                               reference.avg_pool2d(x, (ph, pw), (sh, sw), padding),
                               rtol=1e-5, atol=1e-6)
    grad_output = f32(rng, y.shape)
    np.testing.assert_allclose(
        ops.avg_pool2d_backward(grad_output, x.shape, (ph, pw), (sh, sw), padding),
        reference.avg_pool2d_backward(grad_output, x.shape, (ph, pw), (sh, sw), padding),
        rtol=1e-5, atol=1e-6)


def test_pooling_is_bit_identical_for_any_thread_count(rng):
    x = f32(rng, (5, 13, 11, 7))
    runs = []
    for n_threads in (1, 2, 3):
        y, argmax = ops.max_pool2d_forward(x, 3, 2, "same", n_threads=n_threads)
        back = ops.max_pool2d_backward(y, argmax, x.shape, n_threads=n_threads)
        avg = ops.avg_pool2d_forward(x, 3, 2, "same", n_threads=n_threads)
        avg_back = ops.avg_pool2d_backward(avg, x.shape, 3, 2, "same", n_threads=n_threads)
        runs.append((y, argmax, back, avg, avg_back))
    for other in runs[1:]:
        for first, second in zip(runs[0], other):
            assert np.array_equal(first, second)


def test_max_pool2d_backward_rejects_bad_argmax(rng):
    grad_output = f32(rng, (1, 2, 2, 1))
    with pytest.raises(TypeError, match=r"max_pool2d_backward: argmax must be int32 \(cells\) or uint8 \(window taps\), got int64"):
        _kernels.max_pool2d_backward(grad_output, np.zeros((1, 2, 2, 1), np.int64),
                                     np.empty((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"argmax holds 0\.\.16, outside the 16 cells"):
        _kernels.max_pool2d_backward(grad_output, np.array([0, 1, 2, 16], np.int32).reshape(
            1, 2, 2, 1), np.empty((1, 4, 4, 1), np.float32))


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 6, 5), (33, 300, 17), (4, 5000, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dense_matches_reference(shape, isa, rng):
    n, i, u = shape
    x, kernel, bias = f32(rng, (n, i)), f32(rng, (i, u)), f32(rng, u)
    y = ops.dense_forward(x, kernel, bias, relu=True, n_threads=2)
    expected = np.maximum(x.astype(np.float64) @ kernel + bias, 0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * i ** 0.5)
    grad_output = f32(rng, (n, u))
    got = ops.dense_backward(x, kernel, grad_output, n_threads=2)
    for g, e in zip(got, reference.dense_backward(x, kernel, grad_output)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * max(n, u) ** 0.5)
    assert ops.dense_backward(x, kernel, grad_output, need_input_grad=False)[0] is None


def test_dense_is_bit_identical_for_any_thread_count(rng):
    x, kernel, bias = f32(rng, (32, 3000)), f32(rng, (3000, 128)), f32(rng, 128)
    grad_output = f32(rng, (32, 128))
    runs = [(ops.dense_forward(x, kernel, bias, n_threads=t),
             *ops.dense_backward(x, kernel, grad_output, n_threads=t)) for t in (1, 2, 3)]
    for other in runs[1:]:
        for first, second in zip(runs[0], other):
            assert np.array_equal(first, second)


def test_openmp_is_enabled_on_linux():
    import sys
    if sys.platform.startswith("linux"):
        assert cnnx.openmp_enabled()


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"set_isa: expected one of .*, got 'sse9'"):
        _kernels.set_isa("sse9")


@pytest.mark.parametrize("nan_cell", [0, 1, 3], ids=["first", "second", "last"])
def test_max_pool_propagates_nan_like_the_float64_path(nan_cell, isa):
    # window [1, 2, 3, 0.5] with one NaN: float32 kernels and the NumPy path both yield NaN
    window = np.array([1.0, 2.0, 3.0, 0.5])
    window[nan_cell] = np.nan
    x = window.reshape(1, 2, 2, 1)
    y32, argmax32 = ops.max_pool2d_forward(x.astype(np.float32), 2, 2, "valid", n_threads=1)
    y64, argmax64 = ops.max_pool2d_forward(x, 2, 2, "valid")
    assert np.isnan(y32[0, 0, 0, 0]) and np.isnan(y64[0, 0, 0, 0])
    assert argmax32[0, 0, 0, 0] == argmax64[0, 0, 0, 0] == nan_cell


@pytest.mark.parametrize("dtype", [np.int64, object])
def test_dense_refuses_non_float_arrays(dtype, rng):
    # integer or object arrays used to run through the NumPy path and return int64/object
    x, kernel = np.ones((2, 3), dtype), f32(rng, (3, 4))
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"dense_forward expects x of dtype float32 .*got {name}"):
        ops.dense_forward(x, kernel, None)
    with pytest.raises(TypeError, match=rf"dense_forward expects kernel .*got {name}"):
        ops.dense_forward(f32(rng, (2, 3)), kernel.astype(dtype), None)
    with pytest.raises(TypeError, match=rf"dense_backward expects x .*got {name}"):
        ops.dense_backward(x, kernel, f32(rng, (2, 4)))


def test_dense_refuses_lists_and_wrong_ranks(rng):
    with pytest.raises(TypeError, match=r"dense_forward expects kernel as a numpy.ndarray "
                                        r"\(I, U\), got list"):
        ops.dense_forward(f32(rng, (2, 3)), [[1.0] * 4] * 3, None)
    with pytest.raises(ValueError, match=r"dense_forward expects x of shape \(N, I\), "
                                         r"got \(2, 3, 1\)"):
        ops.dense_forward(f32(rng, (2, 3, 1)), f32(rng, (3, 4)), None)


TILING_POOLS = [  # windows that tile the input (strides == pool): the one-pass backward
    ((2, 6, 5, 3), 2, 2, "valid"),        # odd width: last column belongs to no window
    ((2, 7, 7, 5), 2, 2, "same"),         # padding: last window clipped
    ((1, 9, 8, 17), 3, 3, "valid"),
    ((3, 5, 9, 1), (1, 3), (1, 3), "same"),
    ((1, 11, 10, 33), (2, 3), (2, 3), "valid"),
]


@pytest.mark.parametrize("x_shape, pool, strides, padding", TILING_POOLS,
                         ids=[f"{'x'.join(map(str, p[0]))}-p{p[1]}-{p[3]}" for p in TILING_POOLS])
def test_max_pool2d_one_pass_backward_matches_reference(x_shape, pool, strides, padding,
                                                        isa, rng):
    x = f32(rng, x_shape)
    y, argmax = ops.max_pool2d_forward(x, pool, strides, padding, n_threads=2)
    expected_y, expected_argmax = reference.max_pool2d(x, pool, strides, padding)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)
    grad_output = f32(rng, y.shape)
    stale = np.full(x.shape, 7.0, np.float32)          # a reused buffer: every cell rewritten
    grads = [ops.max_pool2d_backward(grad_output, argmax, x.shape, n_threads=t,
                                     pool_size=pool, strides=strides, padding=padding,
                                     out=stale.copy()) for t in (1, 2, 3)]
    expected = reference.max_pool2d_backward(grad_output, argmax, x.shape)
    np.testing.assert_array_equal(grads[0], expected.astype(np.float32))
    for other in grads[1:]:
        assert np.array_equal(grads[0], other)


def test_max_pool2d_forward_is_bit_identical_for_any_thread_count_and_isa(rng):
    x = f32(rng, (5, 13, 11, 19))
    x[0, 3, 4, 2] = np.nan
    runs = []
    for isa_name in (["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]):
        _kernels.set_isa(isa_name)
        runs += [ops.max_pool2d_forward(x, 2, 2, "same", n_threads=t) for t in (1, 2, 3)]
    _kernels.set_isa("auto")
    for y, argmax in runs[1:]:
        np.testing.assert_array_equal(y, runs[0][0])
        assert np.array_equal(argmax, runs[0][1])


def test_max_pool2d_layer_reuses_its_buffers_across_training_steps(rng):
    layer = cnnx.nn.MaxPool2D(2)
    layer.build((6, 6, 3), rng)
    x = f32(rng, (2, 6, 6, 3))
    first = layer.forward(x, training=True)
    first_grad = layer.backward(np.ones_like(first))
    second = layer.forward(x * 2, training=True)
    second_grad = layer.backward(np.ones_like(second))
    assert second is first and second_grad is first_grad        # no fresh big arrays per step
    np.testing.assert_array_equal(second, reference.max_pool2d(x * 2, 2, 2, "valid")[0])
    assert layer.forward(x) is not first                          # inference: a fresh array


WINDOW_POOLS = [  # (x shape, pool, strides, padding): vector blocks of 8 channels and a tail
    ((2, 7, 9, 8), 2, 2, "valid"),
    ((3, 9, 7, 32), 2, 2, "same"),
    ((2, 8, 8, 41), 3, 2, "same"),         # overlapping windows: the scatter backward
    ((1, 11, 10, 16), (2, 3), (2, 3), "valid"),
    ((2, 6, 7, 24), 3, 1, "valid"),
]


@pytest.mark.parametrize("x_shape, pool, strides, padding", WINDOW_POOLS,
                         ids=[f"{'x'.join(map(str, p[0]))}-p{p[1]}-s{p[2]}-{p[3]}"
                              for p in WINDOW_POOLS])
def test_max_pool2d_window_taps_match_the_cell_index(x_shape, pool, strides, padding, isa, rng):
    """A uint8 argmax holds the tap i*pool_w + j inside each window: the same maxima and the
    same gradients as the int32 cell index, for any thread count."""
    x = f32(rng, x_shape)
    x[-1, 2:4, 2:4, 3] = 1.5                              # a tie: the first cell wins
    expected_y, expected_cells = reference.max_pool2d(x, pool, strides, padding)
    _, _, top, left = ops._geometry(x_shape[1], x_shape[2], *ops._pair(pool, "pool"),
                                    ops._pair(strides, "strides"), padding)
    ph, pw = ops._pair(pool, "pool")
    sh, sw = ops._pair(strides, "strides")
    oh, ow = expected_y.shape[1:3]
    rows = expected_cells // x_shape[2] - (np.arange(oh) * sh - top)[:, None, None]
    columns = expected_cells % x_shape[2] - (np.arange(ow) * sw - left)[:, None]
    expected_taps = (rows * pw + columns).astype(np.uint8)
    grad_output = f32(rng, expected_y.shape)
    expected_grad = reference.max_pool2d_backward(grad_output, expected_cells, x_shape)
    for n_threads in (1, 2, 3):
        y, taps = np.empty_like(expected_y, np.float32), np.empty(expected_y.shape, np.uint8)
        _kernels.max_pool2d_forward(x, y, taps, (ph, pw), (sh, sw), (top, left),
                                    n_threads=n_threads)
        np.testing.assert_array_equal(y, expected_y)
        np.testing.assert_array_equal(taps, expected_taps)
        grad = _kernels.max_pool2d_backward(grad_output, taps, np.full(x_shape, 7, np.float32),
                                            (ph, pw), (sh, sw), (top, left), n_threads=n_threads)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_max_pool2d_streamed_backward_matches_reference(isa, rng):
    """A grad_input over 16 MB is written with non-temporal stores (AVX2): same values."""
    x = f32(rng, (2, 130, 128, 64))                       # 17 MB
    y, taps = ops.max_pool2d_forward(x, 2, 2, "valid", out=(
        np.empty((2, 65, 64, 64), np.float32), np.empty((2, 65, 64, 64), np.uint8)))
    _, cells = reference_max_pool_cells(x)
    grad_output = f32(rng, y.shape)
    grads = [ops.max_pool2d_backward(grad_output, taps, x.shape, n_threads=t, pool_size=2,
                                     out=np.full(x.shape, 7, np.float32)) for t in (1, 2)]
    np.testing.assert_array_equal(grads[0], reference_backward_tiling(grad_output, cells, x.shape))
    assert np.array_equal(grads[0], grads[1])


def reference_max_pool_cells(x):
    """2x2 stride-2 max pool by NumPy: (y, int32 cell index of the first max)."""
    n, h, w, c = x.shape
    windows = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(
        n, h // 2, w // 2, c, 4)
    tap = windows.argmax(axis=-1)
    cells = ((np.arange(h // 2)[:, None, None] * 2 + tap // 2) * w
             + np.arange(w // 2)[:, None] * 2 + tap % 2)
    return windows.max(axis=-1), cells.astype(np.int32)


def reference_backward_tiling(grad_output, cells, shape):
    n, h, w, c = shape
    grad = np.zeros((n, h * w, c), np.float32)
    batch, _, _, channel = np.indices(cells.shape)
    grad[batch, cells, channel] = grad_output
    return grad.reshape(shape)


def test_max_pool2d_uint8_argmax_errors(rng):
    grad_output = f32(rng, (1, 2, 2, 1))
    taps = np.zeros((1, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match=r"max_pool2d_backward: a uint8 argmax holds taps "
                                         r"inside each window; give the forward's pool_size"):
        _kernels.max_pool2d_backward(grad_output, taps, np.empty((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"max_pool2d_forward: a uint8 argmax holds at most "
                                         r"256 taps, the pool \(17, 17\) has 289"):
        _kernels.max_pool2d_forward(f32(rng, (1, 17, 17, 1)), np.empty((1, 1, 1, 1), np.float32),
                                    np.empty((1, 1, 1, 1), np.uint8), (17, 17), (17, 17))
    taps[0, 1, 1, 0] = 8                                   # tap 8 of a 3x3 window at the edge
    with pytest.raises(ValueError, match=r"max_pool2d_backward: argmax holds window taps "
                                         r"outside their windows inside the input plane"):
        _kernels.max_pool2d_backward(grad_output, taps, np.empty((1, 3, 3, 1), np.float32),
                                     (3, 3), (2, 2), (1, 1))


@pytest.mark.parametrize("pool, strides, index_type", [(2, None, np.uint8),
                                                       ((2, 3), (2, 3), np.uint8),
                                                       (3, 2, np.int32)],
                         ids=["2x2", "2x3-tiling", "3x3-overlapping"])
def test_max_pool2d_layer_keeps_tiling_window_taps_as_bytes(pool, strides, index_type, rng):
    layer = cnnx.nn.MaxPool2D(pool, strides=strides)
    layer.build((7, 6, 16), rng)
    x = f32(rng, (2, 7, 6, 16))
    y = layer.forward(x, training=True)
    assert layer._argmax.dtype == index_type and layer._argmax.shape == y.shape
    grad_output = f32(rng, y.shape)
    _, cells = reference.max_pool2d(x, pool, strides or pool, "valid")
    np.testing.assert_allclose(layer.backward(grad_output),
                               reference.max_pool2d_backward(grad_output, cells, x.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 8, 11])
def test_max_pool2d_window_taps_take_the_first_nan(channels, isa):
    window = np.array([1.0, 2.0, np.nan, 0.5, np.nan, 3.0], np.float32)   # 2x3 window
    x = np.repeat(window.reshape(1, 2, 3, 1), channels, axis=3)
    y, taps = np.empty((1, 1, 1, channels), np.float32), np.empty((1, 1, 1, channels), np.uint8)
    _kernels.max_pool2d_forward(x, y, taps, (2, 3), (2, 3))
    assert np.isnan(y).all() and (taps == 2).all()


@pytest.mark.parametrize("x_shape, pool, padding", [((2, 7, 9, 8), 2, "valid"),
                                                    ((2, 7, 8, 19), 3, "same"),
                                                    ((1, 5, 11, 16), (2, 3), "same")],
                         ids=["2x2-valid", "3x3-same", "2x3-same"])
def test_avg_pool2d_tiling_backward_is_each_share_over_its_count(x_shape, pool, padding, isa,
                                                                 rng):
    """Windows that tile the input: every cell takes its window's share / cell count, the
    float32 division (a product only where count is a power of two: the same bits)."""
    grad_output_shape = (x_shape[0], *ops.max_pool2d_forward(
        np.zeros(x_shape), pool, pool, padding)[0].shape[1:])
    grad_output = f32(rng, grad_output_shape)
    ph, pw = ops._pair(pool, "pool")
    _, _, top, left = ops._geometry(x_shape[1], x_shape[2], ph, pw, (ph, pw), padding)
    expected = np.zeros(x_shape, np.float32)
    for oy in range(grad_output_shape[1]):
        rows = range(max(oy * ph - top, 0), min(oy * ph - top + ph, x_shape[1]))
        for ox in range(grad_output_shape[2]):
            columns = range(max(ox * pw - left, 0), min(ox * pw - left + pw, x_shape[2]))
            count = np.float32(len(rows) * len(columns))
            for r in rows:
                for q in columns:
                    expected[:, r, q] = np.float32(0) + grad_output[:, oy, ox] / count
    for n_threads in (1, 2, 3):
        got = ops.avg_pool2d_backward(grad_output, x_shape, pool, pool, padding,
                                      n_threads=n_threads)
        np.testing.assert_array_equal(got, expected)


MASKED_POOLS = [  # (x shape, pool, strides, padding, index dtype)
    ((2, 7, 9, 8), 2, 2, "valid", np.uint8),       # tiling, one AVX2 vector, odd width
    ((3, 9, 7, 35), 2, 2, "same", np.uint8),       # tiling, vectors and a tail, clipped
    ((2, 7, 9, 8), 2, 2, "valid", np.int32),       # tiling, cell index
    ((1, 11, 10, 17), (2, 3), (2, 3), "valid", np.int32),
    ((2, 8, 8, 41), 3, 2, "same", np.int32),       # overlapping windows: the scatter
    ((2, 8, 8, 13), 3, 2, "same", np.uint8),       # overlapping windows, window taps
    ((2, 6, 7, 9), 3, 1, "valid", np.int32),       # a cell the max of up to nine windows
]


def relu_output_with_edge_maxima(rng, shape):
    """A pool input with windows whose max is negative, +0, -0 or NaN, and many ties (the
    ReLU output itself is >= 0 or NaN; the kernel must not rely on it)."""
    x = np.maximum(f32(rng, shape), 0).astype(np.float32)
    x[0, :, :, 4:] = -np.abs(x[0, :, :, 4:]) - 1               # negative maxima
    x[-1, :, :, 1] = 0.0                                       # +0 maxima (all tied)
    x[-1, :, :, 2] = -0.0
    x[-1, 1:3, 1:3, 3] = np.nan                                # NaN maxima
    return x


def gradient_with_edge_values(rng, shape):
    """Negative values (grad * 0 is -0), NaN and infinities (inf * 0 is NaN)."""
    grad = f32(rng, shape)
    flat = grad.reshape(-1)
    flat[::7], flat[3::11], flat[5::13] = np.nan, np.inf, -np.inf
    return grad


@pytest.mark.parametrize("x_shape, pool, strides, padding, index_dtype", MASKED_POOLS,
                         ids=[f"{'x'.join(map(str, p[0]))}-p{p[1]}-s{p[2]}-{p[3]}-"
                              f"{np.dtype(p[4]).name}" for p in MASKED_POOLS])
def test_max_pool2d_backward_with_relu_mask_gives_relu_backwards_bits(
        x_shape, pool, strides, padding, index_dtype, isa, rng):
    """relu_y folds ReLU's backward into the pool's: the bits of the pool backward and then
    ReLU's backward (the C kernel and NumPy's grad * (x > 0)), NaN, -0 and inf included."""
    x = relu_output_with_edge_maxima(rng, x_shape)
    ph, pw = ops._pair(pool, "pool")
    sh, sw = ops._pair(strides, "strides")
    oh, ow, top, left = ops._geometry(x_shape[1], x_shape[2], ph, pw, (sh, sw), padding)
    y = np.empty((x_shape[0], oh, ow, x_shape[3]), np.float32)
    argmax = np.empty(y.shape, index_dtype)
    _kernels.max_pool2d_forward(x, y, argmax, (ph, pw), (sh, sw), (top, left))
    assert (y <= 0).any() and np.isnan(y).any() and (y > 0).any()
    grad_output = gradient_with_edge_values(rng, y.shape)
    geometry = ((ph, pw), (sh, sw), (top, left))
    unmasked = _kernels.max_pool2d_backward(grad_output, argmax, np.empty(x_shape, np.float32),
                                            *geometry)
    with np.errstate(invalid="ignore"):                        # inf * 0
        expected = np.multiply(unmasked, x > 0)                # ReLU's backward in NumPy
    relu_kernel = _kernels.relu_backward(x, unmasked.copy())
    assert np.array_equal(expected.view(np.uint32), relu_kernel.view(np.uint32))
    assert np.signbit(expected[expected == 0]).any() and np.isnan(expected).any()
    for n_threads in (1, 2, 3):
        got = _kernels.max_pool2d_backward(grad_output, argmax, np.full(x_shape, 7, np.float32),
                                           *geometry, n_threads=n_threads, relu_y=y)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), n_threads
        assert np.array_equal(np.isnan(got), np.isnan(expected))


def test_max_pool2d_streamed_backward_with_relu_mask(isa, rng):
    """Over 16 MB (AVX2: non-temporal stores): the masked pass has ReLU backward's bits."""
    x = np.maximum(f32(rng, (2, 130, 128, 64)), 0)
    y, taps = ops.max_pool2d_forward(x, 2, 2, "valid")
    grad_output = gradient_with_edge_values(rng, y.shape)
    unmasked = ops.max_pool2d_backward(grad_output, taps, x.shape, pool_size=2)
    with np.errstate(invalid="ignore"):
        expected = np.multiply(unmasked, x > 0)
    got = ops.max_pool2d_backward(grad_output, taps, x.shape, pool_size=2, relu_y=y,
                                  out=np.full(x.shape, 7, np.float32))
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("pool, strides, padding", [(2, 2, "same"), (3, 2, "same"), (3, 1, "valid")])
def test_max_pool2d_float64_backward_with_relu_mask(pool, strides, padding, rng):
    """The float64 path (gradient checks) folds the mask in with NumPy's bits."""
    x = relu_output_with_edge_maxima(rng, (2, 7, 8, 5)).astype(np.float64)
    y, argmax = ops.max_pool2d_forward(x, pool, strides, padding)
    grad_output = gradient_with_edge_values(rng, y.shape).astype(np.float64)
    kwargs = dict(pool_size=pool, strides=strides, padding=padding)
    with np.errstate(invalid="ignore"):                        # inf - inf, inf * 0
        unmasked = ops.max_pool2d_backward(grad_output, argmax, x.shape, **kwargs)
        expected = np.multiply(unmasked, x > 0)
        got = ops.max_pool2d_backward(grad_output, argmax, x.shape, relu_y=y, **kwargs)
    assert got.dtype == np.float64
    assert np.array_equal(got.view(np.uint64), expected.view(np.uint64))


def test_max_pool2d_backward_rejects_a_relu_y_of_another_shape(rng):
    grad_output = f32(rng, (1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"max_pool2d_backward: relu_y must have shape"):
        _kernels.max_pool2d_backward(grad_output, np.zeros((1, 2, 2, 3), np.uint8),
                                     np.empty((1, 4, 4, 3), np.float32), 2, 2,
                                     relu_y=np.zeros((1, 2, 2, 2), np.float32))
