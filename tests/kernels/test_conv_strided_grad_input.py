"""The input gradient of strided convolutions, computed as one stride-1 convolution per
stride phase (ops._strided_grad_input): against the float64 reference on odd geometries,
on both micro-kernels, the same bits for any thread count."""
import itertools

import numpy as np
import pytest

from cnnx import ops

# (kernel (KH, KW), strides, padding, input (H, W)): odd sizes, kernels narrower than their
# stride (phases with no taps), 'same' pads, cells past every window's reach, 5x5 stride 2
GEOMETRIES = [((5, 5), (2, 2), "valid", (13, 11)), ((5, 5), (2, 2), "same", (12, 9)),
              ((3, 3), (2, 2), "same", (7, 10)), ((3, 2), (3, 2), "valid", (11, 8)),
              ((1, 1), (2, 3), "valid", (5, 7)), ((2, 4), (3, 2), "same", (9, 6)),
              ((4, 3), (2, 3), "valid", (10, 13)), ((7, 5), (3, 2), "same", (8, 12))]


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def case(rng, kernel_size, strides, padding, size, channels=3, filters=5, batch=2):
    x = f32(rng, (batch, *size, channels))
    kernel = f32(rng, (*kernel_size, channels, filters))
    grad_output = f32(rng, ops.conv2d_forward(x, kernel, None, strides, padding).shape)
    return x, kernel, grad_output


@pytest.mark.parametrize("kernel_size, strides, padding, size", GEOMETRIES)
def test_matches_the_float64_reference(isa, rng, kernel_size, strides, padding, size):
    x, kernel, grad_output = case(rng, kernel_size, strides, padding, size)
    grad_input, _, _ = ops.conv2d_backward(x, kernel, grad_output, strides, padding)
    expected, _, _ = ops.conv2d_backward(*(a.astype(np.float64) for a in (x, kernel,
                                                                           grad_output)),
                                         strides, padding)
    np.testing.assert_allclose(grad_input, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size, strides, padding, size", GEOMETRIES[:4])
def test_the_same_bits_for_any_thread_count(isa, rng, kernel_size, strides, padding, size):
    x, kernel, grad_output = case(rng, kernel_size, strides, padding, size, channels=17,
                                  filters=20, batch=5)
    results = [ops.conv2d_backward(x, kernel, grad_output, strides, padding,
                                   n_threads=n)[0] for n in (1, 2, 3)]
    for other in results[1:]:
        assert np.array_equal(results[0].view(np.uint32), other.view(np.uint32))


def test_every_cell_is_written_even_into_a_dirty_buffer(rng):
    # cells no kernel tap reaches (kernel 1x1 with stride 2: three phases in four) get 0
    x, kernel, grad_output = case(rng, (1, 1), (2, 2), "valid", (7, 9))
    dirty = np.full(x.shape, np.nan, np.float32)
    grad_input, _, _ = ops.conv2d_backward(x, kernel, grad_output, (2, 2), "valid", out=dirty)
    assert grad_input is dirty and np.isfinite(grad_input).all()
    assert not grad_input[:, 1::2].any() and not grad_input[:, :, 1::2].any()


@pytest.mark.parametrize("strides", list(itertools.product([2, 3], [2, 3])))
def test_every_phase_reaches_its_cells(rng, strides):
    # one nonzero output gradient: its input gradient is the kernel itself, placed at the
    # output's window, whatever phase each of its cells falls in
    x, kernel, grad_output = case(rng, (5, 4), strides, "valid", (16, 15))
    grad_output[...] = 0.0
    grad_output[1, 2, 1, 3] = 1.0
    grad_input, _, _ = ops.conv2d_backward(x, kernel, grad_output, strides, "valid")
    expected = np.zeros_like(grad_input)
    top, left = 2 * strides[0], 1 * strides[1]
    expected[1, top:top + 5, left:left + 4, :] = kernel[:, :, :, 3]
    assert np.array_equal(grad_input, expected)
