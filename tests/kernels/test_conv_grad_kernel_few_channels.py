"""The kernel gradient of few-channel convolutions (C <= 4, F a multiple of 16: the first
layer of every paper network), which takes its own direct path on stride 1: tiles of up to
6 k rows x 16 filters read the padded band and grad_output in place, the bias sums ride on
one tile. Checked against the float64 naive loops on both micro-kernel sets, and bit for bit
across thread counts."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cnnx import _kernels, ops
import reference

ISAS_HERE = ["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def grads_for_each_isa_and_thread_count(x, kernel, grad_output, padding, thread_counts):
    """{isa: [(grad_kernel, grad_bias) per thread count]}, the ISA back on auto after."""
    runs = {}
    try:
        for isa in ISAS_HERE:
            assert _kernels.set_isa(isa) == isa
            runs[isa] = [ops.conv2d_backward(x, kernel, grad_output, 1, padding,
                                             need_input_grad=False, n_threads=t)[1:]
                         for t in thread_counts]
    finally:
        _kernels.set_isa("auto")
    return runs


def assert_matches_reference(got, x, kernel, grad_output, padding):
    _, grad_kernel, grad_bias = reference.conv2d_backward(x, kernel, grad_output, 1, padding)
    # float32 sums of N*OH*OW products: the error grows with the number of terms
    pixels = grad_output[..., 0].size
    np.testing.assert_allclose(got[0], grad_kernel, rtol=1e-5, atol=2e-6 * pixels ** 0.5)
    np.testing.assert_allclose(got[1], grad_bias, rtol=1e-5, atol=2e-6 * pixels ** 0.5)


# (x shape NHWC, kernel shape HWIO, padding): the papers' first layers at a small batch,
# with odd sizes; several bands per image (16 output rows each), several row chunks per
# band, the 8 fixed partials, 1-4 channels, 16-48 filters
CASES = [
    ((3, 37, 35, 3), (3, 3, 3, 16), "same"),       # glasses-like: 27 k rows -> 5,5,6,5,6
    ((2, 45, 41, 1), (3, 3, 1, 32), "valid"),      # comics-like: 9 k rows -> 4,5 per panel
    ((5, 28, 28, 1), (3, 3, 1, 32), "valid"),      # fashion
    ((2, 19, 23, 2), (3, 3, 2, 48), "same"),       # 18 k rows, three filter panels
    ((3, 17, 9, 4), (3, 3, 4, 16), "valid"),       # 36 k rows: 7 tiles
    ((2, 21, 18, 3), (5, 5, 3, 16), "same"),       # 75 k rows, padding 2
    ((4, 7, 6, 1), (1, 1, 1, 16), "valid"),        # one k row: the bias shares its tile
    ((1, 40, 3, 3), (2, 3, 3, 32), "valid"),       # one output column, many rows
    ((2, 19, 17, 4), (8, 8, 4, 16), "same"),       # the deepest: 64 taps x 4 = 256 k rows
]
IDS = [f"{'x'.join(map(str, x))}-k{k[0]}x{k[1]}-f{k[3]}-{p}" for x, k, p in CASES]


@pytest.mark.parametrize("x_shape, kernel_shape, padding", CASES, ids=IDS)
def test_few_channel_grad_kernel_matches_reference_on_both_isas(x_shape, kernel_shape,
                                                                padding, rng):
    x, kernel = f32(rng, x_shape), f32(rng, kernel_shape)
    grad_output = f32(rng, ops.conv2d_forward(x, kernel, None, 1, padding).shape)
    runs = grads_for_each_isa_and_thread_count(x, kernel, grad_output, padding, (1, 2, 3))
    for isa, per_thread_count in runs.items():
        assert_matches_reference(per_thread_count[0], x, kernel, grad_output, padding)
        for other in per_thread_count[1:]:
            for first, second in zip(per_thread_count[0], other):
                assert np.array_equal(first, second), isa


def test_few_channel_grad_kernel_keeps_the_input_gradient_path_apart(rng):
    """need_input_grad=True returns the same kernel and bias gradients as False."""
    x, kernel = f32(rng, (2, 19, 20, 3)), f32(rng, (3, 3, 3, 16))
    grad_output = f32(rng, (2, 19, 20, 16))
    with_input = ops.conv2d_backward(x, kernel, grad_output, 1, "same", n_threads=2)
    without = ops.conv2d_backward(x, kernel, grad_output, 1, "same", need_input_grad=False,
                                  n_threads=2)
    assert without[0] is None and with_input[0].shape == x.shape
    for first, second in zip(with_input[1:], without[1:]):
        assert np.array_equal(first, second)


def test_few_channel_grad_kernel_propagates_nan_and_inf(rng):
    x, kernel = f32(rng, (2, 20, 21, 1)), f32(rng, (3, 3, 1, 16))
    grad_output = f32(rng, (2, 18, 19, 16))
    grad_output[1, 17, 18, 3] = np.nan          # the last pixel: the last tile's last product
    x[0, 0, 0, 0] = np.inf                      # only the (0, 0) tap reads it
    for isa, (run,) in grads_for_each_isa_and_thread_count(x, kernel, grad_output, "valid",
                                                           (2,)).items():
        grad_kernel, grad_bias = run
        assert np.isnan(grad_kernel[:, :, 0, 3]).all() and np.isnan(grad_bias[3]), isa
        assert np.isinf(grad_kernel[0, 0, 0]).sum() + np.isnan(grad_kernel[0, 0, 0]).sum() \
            == 16, isa
        finite = np.ones(grad_kernel.shape, bool)
        finite[:, :, 0, 3] = False
        finite[0, 0] = False
        assert np.isfinite(grad_kernel[finite]).all(), isa


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 23), w=st.integers(1, 23), c=st.integers(1, 4),
       panels=st.integers(1, 3), kh=st.integers(1, 5), kw=st.integers(1, 5),
       padding=st.sampled_from(["valid", "same"]), seed=st.integers(0, 2**16))
def test_few_channel_grad_kernel_random_geometry(n, h, w, c, panels, kh, kw, padding, seed):
    assume(padding == "same" or (kh <= h and kw <= w))  # no output: rejected, tested elsewhere
    rng = np.random.default_rng(seed)
    x, kernel = f32(rng, (n, h, w, c)), f32(rng, (kh, kw, c, 16 * panels))
    grad_output = f32(rng, ops.conv2d_forward(x, kernel, None, 1, padding).shape)
    runs = grads_for_each_isa_and_thread_count(x, kernel, grad_output, padding, (1, 2))
    for isa, (one, two) in runs.items():
        assert_matches_reference(one, x, kernel, grad_output, padding)
        assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]), isa
