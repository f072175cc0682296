"""Element-wise kernels (ReLU backward, optimizer updates) against NumPy formulas."""
import numpy as np
import pytest

from cnnx import _kernels, optim

SIZES = [1, 7, 4095, 4097, 3 * 4096 + 13]


@pytest.mark.parametrize("size", SIZES)
def test_relu_backward_is_numpys_multiply_by_the_mask(size, rng):
    y = rng.standard_normal(size).astype(np.float32)
    y[::5] = 0.0
    grad = rng.standard_normal(size).astype(np.float32)
    grad[::7] = np.nan                                  # a NaN where y <= 0 stays NaN
    expected = grad * (y > 0)
    for n_threads in (1, 2, 3):
        got = _kernels.relu_backward(y, grad.copy(), n_threads=n_threads)
        np.testing.assert_array_equal(got, expected)
        assert np.array_equal(np.signbit(got), np.signbit(expected))


def numpy_adam(param, grad, m, v, b1, b2, step, eps):
    f = np.float32
    m[...] = m * f(b1) + grad * f(1 - b1)
    v[...] = v * f(b2) + (grad * grad) * f(1 - b2)
    param[...] = param - m / (np.sqrt(v) + f(eps)) * f(step)


@pytest.mark.parametrize("size", SIZES)
def test_adam_update_matches_the_float32_formula_bit_for_bit(size, rng):
    param, grad, m = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    v = rng.random(size).astype(np.float32)
    expected = [a.copy() for a in (param, grad, m, v)]
    numpy_adam(*expected, 0.9, 0.999, 1e-3, 1e-7)
    for n_threads in (1, 2, 3):
        got = [a.copy() for a in (param, grad, m, v)]
        _kernels.adam_update(*got, 0.9, 1 - 0.9, 0.999, 1 - 0.999, 1e-3, 1e-7,
                             n_threads=n_threads)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_update_matches_the_float32_formula(momentum, nesterov, rng):
    size = 4096 * 2 + 3
    param, grad, velocity = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    f = np.float32
    step = grad * f(0.01)
    if momentum == 0:
        expected_param, expected_velocity = param - step, velocity
    else:
        expected_velocity = velocity * f(momentum) - step
        expected_param = ((param - step) + expected_velocity * f(momentum) if nesterov
                          else param + expected_velocity)
    for n_threads in (1, 2):
        p, v = param.copy(), velocity.copy()
        _kernels.sgd_update(p, grad, None if momentum == 0 else v, 0.01, momentum, nesterov,
                            n_threads=n_threads)
        np.testing.assert_array_equal(p, expected_param)
        np.testing.assert_array_equal(v, expected_velocity)


@pytest.mark.parametrize("make", [lambda: optim.Adam(1e-2), lambda: optim.SGD(0.1, 0.9, True)],
                         ids=["adam", "nesterov"])
def test_fused_optimizers_agree_with_their_float64_path(make, rng):
    # float64 parameters take the NumPy path: both follow the same maths
    params32 = {"w": rng.standard_normal((33, 17)).astype(np.float32)}
    params64 = {"w": params32["w"].astype(np.float64)}
    fused, numpy_path = make(), make()
    for _ in range(5):
        grad = rng.standard_normal((33, 17))
        fused.apply(params32, {"w": grad.astype(np.float32)})
        numpy_path.apply(params64, {"w": grad})
    np.testing.assert_allclose(params32["w"], params64["w"], rtol=1e-5, atol=1e-5)


def test_updates_refuse_mismatched_shapes(rng):
    param = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"adam_update: grad must have shape \(5\), got \(4,\)"):
        _kernels.adam_update(param, np.zeros(4, np.float32), np.zeros(5, np.float32),
                             np.zeros(5, np.float32), 0.9, 0.1, 0.999, 0.001, 1e-3, 1e-7)


@pytest.mark.parametrize("rows, channels", [(1, 1), (511, 3), (513, 17), (5 * 512 + 7, 32),
                                           (1031, 16), (3, 32)])
def test_channel_sums_match_float64_sums_for_any_thread_count(rows, channels, isa, rng):
    a = rng.standard_normal((rows, channels)).astype(np.float32) + 2
    b = rng.standard_normal((rows, channels)).astype(np.float32)
    runs = [_kernels.channel_sums(a, b, n_threads=t) for t in (1, 2, 3)]
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    # float sums over chunks of 512 rows (16 and 32 channels), double across chunks
    assert (np.abs(runs[0][0] - a64.sum(axis=0)) <= 1e-5 * np.abs(a64).sum(axis=0)).all()
    assert (np.abs(runs[0][1] - (a64 * b64).sum(axis=0))
            <= 1e-5 * np.abs(a64 * b64).sum(axis=0)).all()
    for sums, products in runs[1:]:
        assert np.array_equal(sums, runs[0][0]) and np.array_equal(products, runs[0][1])
    _, squares = _kernels.channel_sums(a, n_threads=2)
    np.testing.assert_allclose(squares, (a64 * a64).sum(axis=0), rtol=1e-5)


def test_channel_affine_is_the_float32_formula(rng):
    a, b = (rng.standard_normal((1031, 5)).astype(np.float32) for _ in range(2))
    a_scale, b_scale, shift, a_shift, b_shift = (rng.standard_normal(5).astype(np.float32)
                                                 for _ in range(5))
    out = np.empty_like(a)
    for n_threads in (1, 2):
        _kernels.channel_affine(a, a_scale, shift, out, n_threads=n_threads)
        np.testing.assert_array_equal(out, a * a_scale + shift)
        _kernels.channel_affine(a, a_scale, shift, out, b=b, b_scale=b_scale, a_shift=a_shift,
                                b_shift=b_shift, n_threads=n_threads)
        np.testing.assert_array_equal(
            out, ((a - a_shift) * a_scale + (b - b_shift) * b_scale) + shift)


@pytest.mark.parametrize("size", [1, 7, 8, 9, 4095, 4096 * 3 + 5])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_dropout_mask_is_numpys_philox_thresholded(size, rate, rng):
    key = rng.integers(0, 2**64, size=2, dtype=np.uint64)
    # element i takes the i-th 32-bit half word of numpy.random.Philox(key=key)'s stream
    raw = np.random.Philox(key=key).random_raw((size + 1) // 2).astype("<u8")
    expected = raw.view("<u4")[:size] >= round(rate * 2**32)
    for n_threads in (1, 2, 3):
        keep = _kernels.dropout_mask(np.empty(size, np.uint8), key, rate, n_threads=n_threads)
        np.testing.assert_array_equal(keep.astype(bool), expected)


def test_dropout_apply_is_x_times_the_scaled_mask(rng):
    x = rng.standard_normal(5000).astype(np.float32)
    x[3] = np.nan
    keep = (rng.random(5000) > 0.3).astype(np.uint8)
    scale = np.float32(1 / 0.7)
    expected = x * np.where(keep, scale, np.float32(0))
    for n_threads in (1, 2):
        got = _kernels.dropout_apply(x, keep, scale, np.empty_like(x), n_threads=n_threads)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("make, shape", [
    (lambda: __import__("cnnx").nn.BatchNormalization(), (5, 7, 9, 33)),
    (lambda: __import__("cnnx").nn.Dropout(0.3), (5, 7, 9, 33)),
], ids=["batchnorm", "dropout"])
def test_memory_bound_layers_give_the_same_bits_for_any_thread_count(make, shape, rng):
    import cnnx
    x = rng.standard_normal(shape).astype(np.float32) + 3
    grad = rng.standard_normal(shape).astype(np.float32)
    runs = []
    for n_threads in (1, 2, 3):
        layer = make()
        layer.build(shape[1:], np.random.default_rng(0))
        with cnnx.num_threads(n_threads):
            y = layer.forward(x, training=True, rng=np.random.default_rng(5)).copy()
            grad_input = layer.backward(grad.copy()).copy()
        runs.append((y, grad_input, *(g.copy() for g in layer.grads.values()),
                     *(s.copy() for s in layer.state.values())))
    for other in runs[1:]:
        for first, second in zip(runs[0], other):
            assert np.array_equal(first, second)


@pytest.mark.parametrize("make", [
    lambda: optim.Adagrad(1e-2), lambda: optim.RMSprop(1e-2), lambda: optim.AdaMax(1e-2),
    lambda: optim.Nadam(1e-2), lambda: optim.SGD(0.1)],
    ids=["adagrad", "rmsprop", "adamax", "nadam", "sgd"])
def test_every_fused_optimizer_agrees_with_its_float64_path(make, rng):
    params32 = {"w": rng.standard_normal((4099,)).astype(np.float32)}
    params64 = {"w": params32["w"].astype(np.float64)}
    fused, numpy_path = make(), make()
    for _ in range(5):
        grad = rng.standard_normal(4099)
        fused.apply(params32, {"w": grad.astype(np.float32)})
        numpy_path.apply(params64, {"w": grad})
    np.testing.assert_allclose(params32["w"], params64["w"], rtol=1e-5, atol=1e-5)
    for name, table in fused.slots.items():
        for key, value in table.items():
            np.testing.assert_allclose(value, numpy_path.slots[name][key], rtol=1e-5, atol=1e-6)


def test_adamax_update_keeps_numpys_nan_rule(rng):
    param, m, u = np.zeros(3, np.float32), np.zeros(3, np.float32), np.array(
        [np.nan, 1.0, 0.0], np.float32)
    grad = np.array([1.0, np.nan, 2.0], np.float32)
    _kernels.adamax_update(param, grad, m, u, 0.9, 0.1, 0.999, 1e-3, 1e-7)
    expected_u = np.maximum(np.array([np.nan, 1.0, 0.0], np.float32) * np.float32(0.999),
                            np.abs(grad))
    np.testing.assert_array_equal(u, expected_u)


@pytest.mark.parametrize("size", SIZES)
def test_relu_forward_is_numpys_maximum(size, rng):
    from cnnx.nn import activations
    x = rng.standard_normal(size).astype(np.float32)
    x[::7] = np.nan
    expected = np.maximum(x, 0)
    for n_threads in (1, 2, 3):
        got = _kernels.relu_forward(x, np.empty_like(x), n_threads=n_threads)
        np.testing.assert_array_equal(got, expected)
    out = np.full_like(x, 5.0)
    assert activations.relu(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(activations.relu(x.astype(np.float64)), np.maximum(x, 0))


def test_channel_sums_shift_the_products(rng):
    a = rng.standard_normal((1500, 32)).astype(np.float32)
    b = rng.standard_normal((1500, 32)).astype(np.float32)
    a_shift, b_shift = (rng.standard_normal(32).astype(np.float32) for _ in range(2))
    sums, products = _kernels.channel_sums(a, b, a_shift, b_shift, n_threads=2)
    expected = ((a.astype(np.float64) - a_shift) * (b.astype(np.float64) - b_shift)).sum(axis=0)
    np.testing.assert_allclose(products, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sums, (a.astype(np.float64) - a_shift).sum(axis=0), rtol=1e-4,
                               atol=1e-3)


def test_batch_normalization_normalises_data_far_from_zero(rng):
    # mean / std = 1e5: E[x^2] - E[x]^2 in float sums would lose every digit of the variance
    import cnnx
    layer = cnnx.nn.BatchNormalization()
    layer.build((32,), rng)
    x = (1000 + 0.01 * rng.standard_normal((4096, 32))).astype(np.float32)
    y = layer.forward(x, training=True)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(axis=0)) / np.sqrt(x64.var(axis=0) + layer.epsilon)
    np.testing.assert_allclose(y, expected, atol=2e-3)
    grad = layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert np.isfinite(grad).all() and np.isfinite(layer.grads["gamma"]).all()
