"""A pooling layer's geometry, worked out once at build (ops.pool_geometry ->
_kernels.PoolGeometry) and handed to every call: the same bits as the calls that work it
out, arrays checked against it, pickled with its layer."""
import pickle

import numpy as np
import pytest

from cnnx import _kernels, nn, ops

POOLS = [(2, None, "valid"), (2, None, "same"), (3, 2, "same"), ((2, 3), (1, 2), "valid")]


def pool_id(case):
    return "-".join(str(v) for v in case)


@pytest.mark.parametrize("kind", [nn.MaxPool2D, nn.AvgPool2D], ids=lambda k: k.__name__)
@pytest.mark.parametrize("case", POOLS, ids=pool_id)
def test_a_built_pool_gives_the_bits_of_an_unbuilt_one(kind, case, rng):
    pool_size, strides, padding = case
    built, unbuilt = kind(pool_size, strides, padding), kind(pool_size, strides, padding)
    output_shape = built.build((9, 7, 5), rng)
    assert built.geometry == ops.pool_geometry((9, 7, 5), pool_size, strides, padding)
    assert built.geometry.output_size == output_shape[:2] and unbuilt.geometry is None
    x = rng.standard_normal((3, 9, 7, 5)).astype(np.float32)
    x[0, :4] = 0.0                                       # ties
    y = built.forward(x, training=True)
    assert np.array_equal(y, unbuilt.forward(x, training=True))
    grad_output = rng.standard_normal(y.shape).astype(np.float32)
    expected = unbuilt.backward(grad_output.copy())
    assert np.array_equal(built.backward(grad_output.copy()).view(np.uint32),
                          expected.view(np.uint32))
    # another input size than the built one: the arguments, not the geometry
    other = rng.standard_normal((2, 11, 8, 5)).astype(np.float32)
    assert np.array_equal(built.forward(other, training=True),
                          kind(pool_size, strides, padding).forward(other, training=True))


def test_pool_ops_with_a_geometry_match_the_ops_without(rng):
    geometry = ops.pool_geometry((8, 9, 3), 2, None, "same")
    x = rng.standard_normal((2, 8, 9, 3)).astype(np.float32)
    shape = (2, *geometry.output_size, 3)
    y, taps = ops.max_pool2d_forward(x, geometry=geometry, out=(np.empty(shape, np.float32),
                                                                np.empty(shape, np.uint8)))
    expected = ops.max_pool2d_forward(x, 2, None, "same", out=(np.empty(shape, np.float32),
                                                                np.empty(shape, np.uint8)))
    assert np.array_equal(y, expected[0]) and np.array_equal(taps, expected[1])
    grad = rng.standard_normal(shape).astype(np.float32)
    got = ops.max_pool2d_backward(grad, taps, x.shape, out=np.empty_like(x), relu_y=y,
                                  geometry=geometry)
    assert np.array_equal(got, ops.max_pool2d_backward(grad, taps, x.shape, pool_size=2,
                                                       padding="same", relu_y=y))
    np.testing.assert_array_equal(ops.avg_pool2d_forward(x, geometry=geometry),
                                  ops.avg_pool2d_forward(x, 2, None, "same"))
    x64 = x.astype(np.float64)                            # the float64 path reads it too
    np.testing.assert_array_equal(ops.avg_pool2d_backward(grad.astype(np.float64), x.shape,
                                                          geometry=geometry),
                                  ops.avg_pool2d_backward(grad.astype(np.float64), x.shape, 2,
                                                          None, "same"))
    assert ops.max_pool2d_forward(x64, geometry=geometry)[0].dtype == np.float64


def test_a_geometry_call_checks_its_arrays(rng):
    geometry = ops.pool_geometry((8, 8, 3), 2)
    y, taps = np.empty((1, 4, 4, 3), np.float32), np.empty((1, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"max_pool2d_forward: x must have shape "
                                         r"\(any, 8, 8, 3\), got \(1, 8, 9, 3\)"):
        _kernels.max_pool2d_forward(np.zeros((1, 8, 9, 3), np.float32), y, taps,
                                    geometry=geometry)
    with pytest.raises(ValueError, match=r"max_pool2d_backward: grad_input must have shape "
                                         r"\(1, 8, 8, 3\), got \(1, 8, 8, 4\)"):
        _kernels.max_pool2d_backward(y, taps, np.empty((1, 8, 8, 4), np.float32),
                                     geometry=geometry)
    with pytest.raises(ValueError, match=r"avg_pool2d_forward: y must have shape "
                                         r"\(1, 4, 4, 3\), got \(1, 4, 5, 3\)"):
        _kernels.avg_pool2d_forward(np.zeros((1, 8, 8, 3), np.float32),
                                    np.empty((1, 4, 5, 3), np.float32), geometry=geometry)
    with pytest.raises(ValueError, match=r"pooling: output \(5, 4\) .* has windows outside"):
        _kernels.PoolGeometry((8, 8, 3), (2, 2), (2, 2), (0, 0), (5, 4))


def test_a_pool_geometry_travels_with_its_layer(rng):
    model = nn.Sequential([nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(3, 2),
                           nn.AvgPool2D(2), nn.Flatten(), nn.Dense(2)], input_shape=(15, 13, 1))
    clone = pickle.loads(pickle.dumps(model))
    for layer, copy in zip(model.layers[1:3], clone.layers[1:3]):
        assert copy.geometry == layer.geometry and hash(copy.geometry) == hash(layer.geometry)
    x = rng.standard_normal((2, 15, 13, 1)).astype(np.float32)
    np.testing.assert_array_equal(clone.predict(x), model.predict(x))
