"""The convolution with a max-pool epilogue (conv2d_max_pool_forward): the bits of
conv2d_forward then max_pool2d_forward with uint8 taps, for any thread count and both ISAs,
on odd sizes (a last band shorter than the others, a last row or column no window takes,
clipped 'same' windows), ties and NaN / -0 / inf; and only the geometries it can take. The
fused epilogue pools 2x2 windows with their own rows (pool.c's in-cache 2x2 rows), the
unfused reference with the general ones: two codes checked against each other."""
import numpy as np
import pytest

from cnnx import ops

# (H, W, C, F), conv padding, pool_size, pool padding: 1, 3 and 5 channels; 16 and 32
# filters and odd ones (edge tiles); outputs of one band, several, and a short last one
CASES = [
    ((22, 21, 1, 32), "valid", 2, "valid"),        # 20x19: an odd column no window takes
    ((35, 34, 1, 32), "same", 2, "same"),          # 35x34: 3 bands, last 3 rows, clipped
    ((13, 11, 3, 16), "same", 2, "valid"),
    ((40, 37, 5, 20), "valid", 2, "valid"),        # 38x35: last band 6 rows, 2 panels
    ((19, 18, 2, 7), "same", (4, 2), "same"),      # other tiling windows, 16 % 4 == 0
    ((17, 20, 3, 9), "valid", (1, 3), "valid"),
    ((28, 28, 1, 32), "valid", 2, "valid"),        # fashion's first layer
]


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def case_id(case):
    (h, w, c, f), padding, pool, pool_padding = case
    return f"{h}x{w}x{c}-{f}-{padding}-pool{pool}-{pool_padding}"


def unfused(x, kernel, bias, geometry, pool, pool_padding, relu, n_threads):
    conv = ops.conv2d_forward(x, kernel, bias, relu=relu, geometry=geometry,
                              n_threads=n_threads)
    pool = ops._pair(pool, "pool")
    oh, ow = (ops.output_size(s, p, p, pool_padding) for s, p in zip(conv.shape[1:3], pool))
    shape = (len(x), oh, ow, conv.shape[3])
    out = (np.empty(shape, np.float32), np.empty(shape, np.uint8))
    return ops.max_pool2d_forward(conv, pool, pool, pool_padding, n_threads=n_threads, out=out)


def edge_values(x, rng):
    """Ties (whole images of zeros and of one value), NaN, -0 and infinities."""
    x[0] = 0.0
    x[1] = -0.0
    if len(x) > 3:
        x[3] = 1.5
    flat = x[2].reshape(-1)
    cells = rng.choice(flat.size, size=max(3, flat.size // 40), replace=False)
    flat[cells[0::3]] = np.nan
    flat[cells[1::3]] = np.inf
    flat[cells[2::3]] = -np.inf
    return x


def bits(array):
    return array.view(np.uint32) if array.dtype == np.float32 else array


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_forward_gives_the_unfused_bits(case, relu, isa, rng):
    (h, w, c, f), padding, pool, pool_padding = case
    x = edge_values(f32(rng, (5, h, w, c)), rng)
    kernel, bias = f32(rng, (3, 3, c, f)), f32(rng, (f,))
    kernel[0, 0, 0, :2] = -0.0
    bias[:3] = [0.0, -0.0, -20.0]                         # -20: a filter of zeros after ReLU
    geometry = ops.conv_geometry((h, w, c), 3, f, 1, padding)
    assert ops.can_fuse_max_pool(geometry, pool, padding=pool_padding)
    with np.errstate(invalid="ignore", over="ignore"):
        expected_y, expected_taps = unfused(x, kernel, bias, geometry, pool, pool_padding,
                                            relu, 1)
        assert np.isnan(expected_y).any() and (expected_y == 0).any()
        for n_threads in (1, 2, 3):
            y, taps = ops.conv2d_max_pool_forward(x, kernel, bias, pool, pool_padding,
                                                  relu=relu, n_threads=n_threads,
                                                  geometry=geometry)
            assert y.shape == expected_y.shape and taps.dtype == np.uint8
            assert np.array_equal(bits(y), bits(expected_y)), n_threads
            assert np.array_equal(taps, expected_taps), n_threads


def test_fused_forward_without_bias_writes_into_out(isa, rng):
    x, kernel = f32(rng, (2, 23, 9, 1)), f32(rng, (3, 3, 1, 32))
    geometry = ops.conv_geometry((23, 9, 1), 3, 32, 1, "same")
    expected = unfused(x, kernel, None, geometry, 2, "valid", True, 2)
    out = (np.full((2, 11, 4, 32), np.nan, np.float32), np.full((2, 11, 4, 32), 9, np.uint8))
    y, taps = ops.conv2d_max_pool_forward(x, kernel, None, 2, relu=True, out=out,
                                          geometry=geometry, n_threads=2)
    assert y is out[0] and taps is out[1]
    assert np.array_equal(bits(y), bits(expected[0])) and np.array_equal(taps, expected[1])


@pytest.mark.parametrize("conv, pool", [
    (((3, 3), (2, 2), "valid"), (2, None, "valid")),     # a strided convolution
    (((9, 9), (1, 1), "valid"), (2, None, "valid")),     # 81 taps: not the stride-1 path
    (((3, 3), (1, 1), "valid"), (3, 2, "valid")),        # overlapping windows
    (((3, 3), (1, 1), "valid"), (3, None, "valid")),     # 16 % 3: windows across bands
    (((3, 3), (1, 1), "valid"), (5, None, "same")),      # 'same' with a pad before
    (((3, 3), (1, 1), "valid"), ((2, 32), None, "valid")),  # windows wider than the output
], ids=["strided-conv", "9x9-kernel", "overlapping", "pool-3", "same-pad-before", "wide"])
def test_only_the_pools_a_band_can_hold_are_fused(conv, pool, rng):
    (kernel_size, strides, padding), (pool_size, pool_strides, pool_padding) = conv, pool
    geometry = ops.conv_geometry((28, 26, 1), kernel_size, 4, strides, padding)
    assert not ops.can_fuse_max_pool(geometry, pool_size, pool_strides, pool_padding)
    x, kernel = f32(rng, (1, 28, 26, 1)), f32(rng, (*kernel_size, 1, 4))
    if pool_strides is None:
        with pytest.raises(ValueError, match=r"cannot be fused .* conv2d_forward then "
                                             r"max_pool2d_forward"):
            ops.conv2d_max_pool_forward(x, kernel, None, pool_size, pool_padding,
                                        geometry=geometry)


def test_fused_forward_refuses_float64_and_wrong_outputs(rng):
    geometry = ops.conv_geometry((8, 8, 1), 3, 4, 1, "valid")
    kernel = f32(rng, (3, 3, 1, 4))
    with pytest.raises(TypeError, match=r"float32 .* got x of float64"):
        ops.conv2d_max_pool_forward(np.zeros((1, 8, 8, 1)), kernel, None, 2, geometry=geometry)
    x = f32(rng, (1, 8, 8, 1))
    with pytest.raises(TypeError, match=r"taps must be uint8, got int32"):
        ops.conv2d_max_pool_forward(x, kernel, None, 2, geometry=geometry,
                                    out=(np.empty((1, 3, 3, 4), np.float32),
                                         np.empty((1, 3, 3, 4), np.int32)))
    with pytest.raises(ValueError, match=r"pooled must have shape \(1, any, any, 4\)"):
        ops.conv2d_max_pool_forward(x, kernel, None, 2, geometry=geometry,
                                    out=(np.empty((1, 3, 3, 5), np.float32),
                                         np.empty((1, 3, 3, 5), np.uint8)))


@pytest.mark.parametrize("shape, padding", [((3, 9, 7, 32), "same"), ((3, 10, 11, 41), "valid"),
                                            ((4, 5, 6, 3), "same"), ((3, 4, 4, 8), "valid")],
                         ids=["9x7x32-same", "10x11x41-valid", "5x6x3-same", "4x4x8-valid"])
def test_2x2_window_taps_give_the_bits_of_the_cell_index_path(shape, padding, isa, rng):
    """uint8 window taps against the int32 cell index of 2x2 windows (the unfused reference
    the fused epilogue is checked against above): the same maxima, bit for bit, and the same
    cells, on ties (0, -0, a repeated value), NaN (the first wins) and infinities, clipped
    'same' windows included."""
    x = edge_values(f32(rng, shape), rng)
    x[-1, :, :, ::2] = np.where(rng.random(x[-1, :, :, ::2].shape) < 0.5, -0.0, 0.0)
    n, h, w, c = shape
    oh, ow = (ops.output_size(s, 2, 2, padding) for s in (h, w))
    cells = np.empty((n, oh, ow, c), np.int32)
    expected, cells = ops.max_pool2d_forward(x, 2, 2, padding,
                                             out=(np.empty((n, oh, ow, c), np.float32), cells))
    for n_threads in (1, 3):
        y, taps = ops.max_pool2d_forward(x, 2, 2, padding, n_threads=n_threads,
                                         out=(np.empty_like(expected), np.empty(cells.shape,
                                                                               np.uint8)))
        assert np.array_equal(bits(y), bits(expected))
        rows = np.arange(oh)[:, None, None] * 2 + taps // 2
        columns = np.arange(ow)[:, None] * 2 + taps % 2
        np.testing.assert_array_equal(rows * w + columns, cells)
