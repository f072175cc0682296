"""Convolution forward/backward (float32 kernels) against the naive loops."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnx import _kernels, ops
import reference


# (x shape NHWC, kernel shape HWIO, strides, padding)
CASES = [
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), "valid"),
    ((2, 7, 6, 3), (3, 3, 3, 4), (2, 2), "same"),
    ((2, 7, 6, 1), (3, 3, 1, 5), (1, 1), "valid"),
    ((1, 9, 8, 5), (2, 3, 5, 17), (2, 1), "same"),
    ((2, 6, 5, 3), (5, 5, 3, 7), (1, 1), "same"),
    ((2, 4, 5, 16), (1, 1, 16, 33), (1, 1), "valid"),
    ((1, 8, 8, 2), (3, 3, 2, 3), (3, 3), "valid"),
    ((2, 6, 7, 32), (3, 3, 32, 20), (1, 1), "same"),
    ((2, 9, 7, 3), (3, 3, 3, 16), (1, 1), "same"),        # F % 16 == 0: grad_output in place
    ((1, 5, 6, 16), (3, 3, 16, 32), (1, 1), "valid"),
    # kernel rows narrower than a micro-tile (KW*C < 6): tiles span kernel rows
    ((2, 6, 40, 1), (3, 3, 1, 32), (1, 1), "same"),       # grad_output rows in place
    ((1, 7, 9, 2), (2, 2, 2, 19), (1, 1), "valid"),        # virtual rows, 6 + 2 k rows
    ((2, 5, 8, 1), (3, 3, 1, 16), (1, 1), "valid"),
]
ISAS_HERE = ["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]
IDS = [f"{'x'.join(map(str, c[0]))}-k{c[1][0]}x{c[1][1]}-s{c[2][0]}{c[2][1]}-{c[3]}" for c in CASES]


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def tolerance(kernel_shape):
    depth = int(np.prod(kernel_shape[:3]))
    return {"rtol": 1e-5, "atol": 2e-6 * depth}


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES, ids=IDS)
def test_conv2d_forward_matches_reference(x_shape, kernel_shape, strides, padding, isa, rng):
    x, kernel, bias = f32(rng, x_shape), f32(rng, kernel_shape), f32(rng, kernel_shape[3])
    for relu in (False, True):
        got = ops.conv2d_forward(x, kernel, bias, strides, padding, relu=relu, n_threads=2)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, reference.conv2d(x, kernel, bias, strides, padding, relu),
                                   **tolerance(kernel_shape))


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES, ids=IDS)
def test_conv2d_backward_matches_reference(x_shape, kernel_shape, strides, padding, isa, rng):
    x, kernel = f32(rng, x_shape), f32(rng, kernel_shape)
    grad_output = f32(rng, ops.conv2d_forward(x, kernel, None, strides, padding).shape)
    grad_input, grad_kernel, grad_bias = ops.conv2d_backward(x, kernel, grad_output, strides,
                                                             padding, n_threads=2)
    expected = reference.conv2d_backward(x, kernel, grad_output, strides, padding)
    np.testing.assert_allclose(grad_input, expected[0], **tolerance(kernel_shape))
    np.testing.assert_allclose(grad_kernel, expected[1], rtol=1e-5, atol=1e-5 * x.size ** 0.5)
    np.testing.assert_allclose(grad_bias, expected[2], rtol=1e-5, atol=1e-5 * x.size ** 0.5)
    skipped = ops.conv2d_backward(x, kernel, grad_output, strides, padding,
                                  need_input_grad=False, n_threads=2)
    assert skipped[0] is None
    assert np.array_equal(skipped[1], grad_kernel) and np.array_equal(skipped[2], grad_bias)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 5),
       f=st.integers(1, 20), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), padding=st.sampled_from(["valid", "same"]),
       seed=st.integers(0, 2**16))
def test_conv2d_random_geometry(n, h, w, c, f, kh, kw, sh, sw, padding, seed):
    if padding == "valid" and (kh > h or kw > w):
        return                                     # no output: rejected, tested elsewhere
    rng = np.random.default_rng(seed)
    x, kernel, bias = f32(rng, (n, h, w, c)), f32(rng, (kh, kw, c, f)), f32(rng, f)
    y = ops.conv2d_forward(x, kernel, bias, (sh, sw), padding, n_threads=2)
    np.testing.assert_allclose(y, reference.conv2d(x, kernel, bias, (sh, sw), padding),
                               **tolerance(kernel.shape))
    grad_output = f32(rng, y.shape)
    got = ops.conv2d_backward(x, kernel, grad_output, (sh, sw), padding, n_threads=2)
    expected = reference.conv2d_backward(x, kernel, grad_output, (sh, sw), padding)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels, filters, strides",
                         [(5, 18, 1), (16, 32, 1), (5, 18, 2), (1, 32, 1), (2, 7, 1)])
def test_conv2d_is_bit_identical_for_any_thread_count(channels, filters, strides, rng):
    # 4*48*48 = 9216 output pixels: 12 bands (stride 1) or 3 pixel chunks (stride 2)
    x, kernel = f32(rng, (4, 48, 48, channels)), f32(rng, (3, 3, channels, filters))
    bias = f32(rng, filters)
    grad_output = f32(rng, ops.conv2d_forward(x, kernel, bias, strides, "same").shape)
    runs = []
    for n_threads in (1, 2, 3):
        y = ops.conv2d_forward(x, kernel, bias, strides, "same", relu=True, n_threads=n_threads)
        runs.append((y, *ops.conv2d_backward(x, kernel, grad_output, strides, "same",
                                              n_threads=n_threads)))
    for other in runs[1:]:
        for first, second in zip(runs[0], other):
            assert np.array_equal(first, second)


def test_conv2d_float32_agrees_with_float64_path(rng):
    x, kernel, bias = f32(rng, (2, 11, 10, 3)), f32(rng, (3, 3, 3, 8)), f32(rng, 8)
    y32 = ops.conv2d_forward(x, kernel, bias, 2, "same", relu=True)
    y64 = ops.conv2d_forward(x.astype(np.float64), kernel.astype(np.float64),
                             bias.astype(np.float64), 2, "same", relu=True)
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-5)


def test_conv2d_kernel_rejects_wrong_dtype_and_channels(rng):
    x = f32(rng, (1, 5, 5, 3))
    y = np.empty((1, 3, 3, 4), np.float32)
    geometry = ops.conv_geometry((5, 5, 3), 3, 4, 1, "valid")
    with pytest.raises(TypeError, match=r"conv2d_forward: kernel must be float32, got float64"):
        _kernels.conv2d_forward(geometry, x, np.ones((3, 3, 3, 4)), None, y)
    with pytest.raises(ValueError, match=r"conv2d_forward: kernel must have shape "
                                         r"\(3, 3, 3, 4\), got \(3, 3, 2, 4\)"):
        _kernels.conv2d_forward(geometry, x, f32(rng, (3, 3, 2, 4)), None, y)
    with pytest.raises(ValueError, match=r"conv2d_forward: x must be C-contiguous"):
        _kernels.conv2d_forward(geometry, x[:, :, ::-1], f32(rng, (3, 3, 3, 4)), None, y)
    with pytest.raises(ValueError, match=r"conv2d_forward: x is empty"):
        _kernels.conv2d_forward(geometry, np.empty((0, 5, 5, 3), np.float32),
                                f32(rng, (3, 3, 3, 4)), None, np.empty((0, 3, 3, 4), np.float32))


def test_the_kernels_check_arrays_against_the_geometry(rng):
    """A layer's geometry is checked once, when made; each call checks its arrays against it
    at the Cython boundary (and nowhere above)."""
    geometry = ops.conv_geometry((7, 6, 3), (3, 2), 4, (2, 1), "same")
    assert (geometry.output_size, geometry.pads) == ((4, 6), (1, 0))
    kernel = f32(rng, (3, 2, 3, 4))
    with pytest.raises(ValueError, match=r"conv2d_forward: x must have shape "
                                         r"\(any, 7, 6, 3\), got \(2, 7, 7, 3\)"):
        _kernels.conv2d_forward(geometry, f32(rng, (2, 7, 7, 3)), kernel, None,
                                np.empty((2, 4, 6, 4), np.float32))
    with pytest.raises(ValueError, match=r"conv2d_grad_kernel: grad_output must have shape "
                                         r"\(2, 4, 6, 4\), got \(2, 4, 5, 4\)"):
        _kernels.conv2d_grad_kernel(geometry, f32(rng, (2, 7, 6, 3)), f32(rng, (2, 4, 5, 4)),
                                    np.empty((3, 2, 3, 4), np.float32),
                                    np.empty(4, np.float32))
    with pytest.raises(ValueError, match=r"conv2d_grad_input: grad_input must have shape "
                                         r"\(2, 7, 6, 3\), got \(2, 7, 6, 4\)"):
        _kernels.conv2d_grad_input(geometry, f32(rng, (2, 4, 6, 4)), kernel,
                                   np.empty((2, 7, 6, 4), np.float32))
    with pytest.raises(ValueError, match=r"ConvGeometry: a window lies wholly in the padding"):
        _kernels.ConvGeometry((7, 6, 3), (3, 2), 4, (2, 1), (3, 0), (4, 6))
    with pytest.raises(ValueError, match="does not fit a 2x6 input"):
        ops.conv_geometry((2, 6, 3), 3, 4, 1, "valid")


def test_conv2d_geometry_is_made_at_build_and_travels_with_the_layer(rng):
    import pickle

    from cnnx import nn
    layer = nn.Conv2D(4, (3, 2), strides=(2, 1), padding="same")
    layer.build((7, 6, 3), rng)
    assert layer.geometry == ops.conv_geometry((7, 6, 3), (3, 2), 4, (2, 1), "same")
    copy = pickle.loads(pickle.dumps(layer))           # what Dask does with a model
    assert copy.geometry == layer.geometry
    x = f32(rng, (2, 7, 6, 3))
    np.testing.assert_array_equal(copy.forward(x), layer.forward(x))
    np.testing.assert_array_equal(
        layer.forward(x), ops.conv2d_forward(x, layer.params["kernel"], layer.params["bias"],
                                             (2, 1), "same"))


def test_conv2d_backward_rejects_wrong_grad_output(rng):
    x, kernel = f32(rng, (1, 5, 5, 3)), f32(rng, (3, 3, 3, 4))
    with pytest.raises(ValueError, match=r"grad_output is \(1, 5, 5, 4\), expected \(1, 3, 3, 4\)"):
        ops.conv2d_backward(x, kernel, f32(rng, (1, 5, 5, 4)))


@pytest.mark.parametrize("strides", [1, 2], ids=["stride1-fast-path", "stride2-packed"])
def test_fused_relu_keeps_nan_like_numpy(strides, isa, rng):
    # A NaN must reach the loss (and stop fit) instead of being clipped to 0 by the ReLU.
    x = rng.standard_normal((1, 7, 6, 3)).astype(np.float32)
    x[0, 3, 2, 1] = np.nan
    kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    got = ops.conv2d_forward(x, kernel, None, strides, "same", relu=True, n_threads=1)
    expected = ops.conv2d_forward(x.astype(np.float64), kernel.astype(np.float64), None,
                                  strides, "same", relu=True)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(got).any()
    assert (got[~np.isnan(got)] >= 0).all()


def test_conv2d_forward_refuses_a_list_kernel(rng):
    # used to fail with a raw AttributeError: 'list' object has no attribute 'shape'
    kernel = f32(rng, (3, 3, 2, 4)).tolist()
    with pytest.raises(TypeError, match=r"conv2d_forward expects kernel as a numpy.ndarray "
                                        r"\(KH, KW, C, F\), got list"):
        ops.conv2d_forward(f32(rng, (1, 5, 5, 2)), kernel, None)


def test_conv2d_forward_names_the_shapes_of_a_3d_kernel(rng):
    # used to fail with "not enough values to unpack (expected 4, got 3)"
    with pytest.raises(ValueError, match=r"conv2d_forward expects kernel of shape "
                                         r"\(KH, KW, C, F\), got \(3, 3, 4\)"):
        ops.conv2d_forward(f32(rng, (1, 5, 5, 2)), f32(rng, (3, 3, 4)), None)
    with pytest.raises(ValueError, match=r"conv2d_backward expects kernel of shape "
                                         r"\(KH, KW, C, F\), got \(3, 3, 4\)"):
        ops.conv2d_backward(f32(rng, (1, 5, 5, 2)), f32(rng, (3, 3, 4)), f32(rng, (1, 3, 3, 4)))


def test_conv2d_forward_refuses_an_integer_kernel(rng):
    with pytest.raises(TypeError, match=r"conv2d_forward expects kernel of dtype float32 "
                                        r".*got int64"):
        ops.conv2d_forward(f32(rng, (1, 5, 5, 2)), np.ones((3, 3, 2, 4), np.int64), None)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), h=st.integers(1, 15), w=st.integers(1, 15), c=st.integers(1, 34),
       f=st.integers(1, 40), kh=st.integers(1, 3), kw=st.integers(1, 3),
       padding=st.sampled_from(["valid", "same"]), seed=st.integers(0, 2**16))
def test_small_images_match_reference_on_both_isas_and_any_thread_count(
        n, h, w, c, f, kh, kw, padding, seed):
    """Stride 1 on small images (the fashion net's 13x13 and 11x11): micro-tiles that cross
    output rows and images, ragged filter panels; both micro-kernel sets, 1 and 2 threads."""
    if padding == "valid" and (kh > h or kw > w):
        return
    rng = np.random.default_rng(seed)
    x, kernel, bias = f32(rng, (n, h, w, c)), f32(rng, (kh, kw, c, f)), f32(rng, f)
    grad_output = f32(rng, ops.conv2d_forward(x, kernel, None, 1, padding).shape)
    expected_y = reference.conv2d(x, kernel, bias, (1, 1), padding, True)
    expected_grads = reference.conv2d_backward(x, kernel, grad_output, (1, 1), padding)
    try:
        for isa in ISAS_HERE:
            _kernels.set_isa(isa)
            runs = [(ops.conv2d_forward(x, kernel, bias, 1, padding, relu=True, n_threads=t),
                     *ops.conv2d_backward(x, kernel, grad_output, 1, padding, n_threads=t))
                    for t in (1, 2)]
            np.testing.assert_allclose(runs[0][0], expected_y, **tolerance(kernel.shape))
            for got, expected in zip(runs[0][1:], expected_grads):
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
            for one, two in zip(*runs):
                assert np.array_equal(one, two)
    finally:
        _kernels.set_isa("auto")
