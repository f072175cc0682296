"""One contract for every layer: output shapes, params/grads keys, float64 finite-difference
gradients of the parameters and the input, and the config round trip."""
import json

import numpy as np
import pytest
from reference import numerical_gradient

from cnnx import nn
from cnnx.nn.serialization import LAYER_CLASSES

# (layer factory, input shape without N); odd sizes and strides flush out index bugs
LAYERS = [
    (lambda: nn.Conv2D(4, 3, strides=2, padding="same", activation="relu"), (7, 6, 3)),
    (lambda: nn.Conv2D(3, (2, 3), activation="tanh", use_bias=False), (5, 6, 2)),
    (lambda: nn.Conv2D(2, 3, padding="same", activation="leaky_relu"), (6, 5, 2)),
    (lambda: nn.Conv2D(3, 1, activation="sigmoid", kernel_initializer="he_normal"), (4, 3, 2)),
    (lambda: nn.MaxPool2D(2), (6, 5, 3)),
    (lambda: nn.MaxPool2D(3, strides=2, padding="same"), (7, 6, 2)),
    (lambda: nn.AvgPool2D(2, padding="same"), (5, 7, 2)),
    (lambda: nn.AvgPool2D(3, strides=1), (5, 4, 2)),
    (lambda: nn.Dense(5), (6,)),
    (lambda: nn.Dense(4, activation="relu", kernel_initializer="he_uniform"), (7,)),
    (lambda: nn.Dense(3, activation="sigmoid"), (5,)),
    (lambda: nn.Dense(4, activation="softmax", kernel_initializer="glorot_normal"), (5,)),
    (lambda: nn.Dense(3, activation="tanh", use_bias=False), (4,)),
    (lambda: nn.Flatten(), (3, 4, 2)),
    (lambda: nn.Dropout(0.3), (4, 5)),
    (lambda: nn.BatchNormalization(), (4, 5, 3)),
    (lambda: nn.BatchNormalization(momentum=0.9), (6,)),
    (lambda: nn.Activation("sigmoid"), (7,)),
    (lambda: nn.Activation("tanh"), (2, 3, 2)),
    (lambda: nn.ReLU(), (7,)),
    (lambda: nn.LeakyReLU(0.2), (7,)),
    (lambda: nn.Softmax(), (6,)),
]
BATCH = 3


def layer_id(case):
    layer = case[0]()
    return f"{type(layer).__name__}-{json.dumps(layer.get_config(), sort_keys=True)}"[:80]


def build_float64(factory, input_shape):
    """A built layer whose params are float64, so the ops take their exact NumPy path."""
    layer = factory()
    layer.name = type(layer).__name__.lower()
    layer.input_shape = input_shape
    layer.output_shape = tuple(layer.build(input_shape, np.random.default_rng(0)))
    for name, value in layer.params.items():
        layer.params[name] = value.astype(np.float64)
    # zeros and ones (bias, beta, gamma at init) would hide some wrong gradients
    rng = np.random.default_rng(1)
    for name in ("bias", "gamma", "beta"):
        if name in layer.params:
            layer.params[name] += rng.normal(0, 0.5, layer.params[name].shape)
    return layer


@pytest.mark.parametrize("case", LAYERS, ids=layer_id)
def test_layer_contract_shapes_keys_and_gradients(case, rng):
    factory, input_shape = case
    layer = build_float64(factory, input_shape)
    x = rng.normal(0, 1, (BATCH, *input_shape))
    weights = rng.normal(0, 1, (BATCH, *layer.output_shape))   # loss = sum(y * weights)

    def loss():
        # the same dropout mask every call: a fresh generator with one key
        y = layer.forward(x, training=True, rng=np.random.default_rng(7))
        return float((y * weights).sum())

    y = layer.forward(x, training=True, rng=np.random.default_rng(7))
    assert y.shape == (BATCH, *layer.output_shape)
    assert y.dtype == np.float64
    grad_input = layer.backward(weights.copy())       # backward may overwrite its argument
    assert grad_input.shape == x.shape
    assert set(layer.grads) == set(layer.params)
    for name, param in layer.params.items():
        assert layer.grads[name].shape == param.shape, name

    analytic = {name: grad.copy() for name, grad in layer.grads.items()}
    for name, param in layer.params.items():
        index = rng.choice(param.size, size=min(12, param.size), replace=False)
        numeric = numerical_gradient(loss, param, index)
        np.testing.assert_allclose(analytic[name].flat[index], numeric, rtol=1e-5, atol=1e-7,
                                   err_msg=f"grads[{name!r}]")
    index = rng.choice(x.size, size=min(12, x.size), replace=False)
    np.testing.assert_allclose(grad_input.flat[index], numerical_gradient(loss, x, index),
                               rtol=1e-5, atol=1e-7, err_msg="grad_input")


@pytest.mark.parametrize("case", LAYERS, ids=layer_id)
def test_layer_config_round_trip(case):
    factory, input_shape = case
    layer = factory()
    config = json.loads(json.dumps(layer.get_config()))       # must be JSON-able
    clone = LAYER_CLASSES[type(layer).__name__].from_config(config)
    assert clone.get_config() == layer.get_config()
    rng = np.random.default_rng(0)
    assert clone.build(input_shape, rng) == factory().build(input_shape, rng)


@pytest.mark.parametrize("case", LAYERS, ids=layer_id)
def test_layer_float32_forward_matches_float64(case, rng):
    """The float32 path (C kernels) computes what the float64 reference path computes."""
    factory, input_shape = case
    layer = build_float64(factory, input_shape)
    x = rng.normal(0, 1, (BATCH, *input_shape))
    expected = layer.forward(x, training=True, rng=np.random.default_rng(3))
    grad_output = rng.normal(0, 1, expected.shape)
    expected_grad = layer.backward(grad_output.copy())
    expected_param_grads = {name: value.copy() for name, value in layer.grads.items()}
    for name, value in layer.params.items():
        layer.params[name] = value.astype(np.float32)
    got = layer.forward(x.astype(np.float32), training=True, rng=np.random.default_rng(3))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    got_grad = layer.backward(grad_output.astype(np.float32))
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-5)
    for name, expected_param_grad in expected_param_grads.items():
        np.testing.assert_allclose(layer.grads[name], expected_param_grad, rtol=1e-4,
                                   atol=1e-4, err_msg=f"grads[{name!r}]")


def test_dropout_is_identity_in_inference_and_scales_in_training(rng):
    layer = nn.Dropout(0.25)
    x = np.ones((200, 50), np.float32)
    np.testing.assert_array_equal(layer.forward(x), x)
    y = layer.forward(x, training=True, rng=rng)
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02


def test_batch_normalization_uses_batch_stats_in_training_and_moving_stats_after(rng):
    layer = nn.BatchNormalization(momentum=0.5)
    layer.build((3,), rng)
    x = rng.normal(5, 2, (64, 3)).astype(np.float32)
    y = layer.forward(x, training=True)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=0), 1, atol=1e-3)
    np.testing.assert_allclose(layer.state["moving_mean"], 0.5 * x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(layer.state["moving_variance"], 0.5 + 0.5 * x.var(axis=0),
                               rtol=1e-5)
    inference = layer.forward(x)
    expected = (x - layer.state["moving_mean"]) / np.sqrt(layer.state["moving_variance"] + 1e-3)
    np.testing.assert_allclose(inference, expected, rtol=1e-5, atol=1e-5)


def test_activations_are_stable_at_extreme_inputs():
    x = np.array([[-1e4, 0.0, 1e4]], np.float32)
    for name in ("relu", "leaky_relu", "sigmoid", "tanh", "softmax"):
        y = nn.activations.get(name).forward(x)
        assert np.all(np.isfinite(y)), name
    np.testing.assert_array_equal(nn.activations.get("softmax").forward(x), [[0, 0, 1]])
    np.testing.assert_array_equal(nn.activations.get("sigmoid").forward(x), [[0, 0.5, 1]])
    np.testing.assert_allclose(nn.activations.get("leaky_relu").forward(x), [[-100, 0, 1e4]])


@pytest.mark.parametrize("name, expected_std", [("glorot_uniform", np.sqrt(2 / (300 + 200))),
                                                ("glorot_normal", np.sqrt(2 / (300 + 200))),
                                                ("he_uniform", np.sqrt(2 / 300)),
                                                ("he_normal", np.sqrt(2 / 300))])
def test_initializers_have_the_papers_variance(name, expected_std):
    # Conv kernel 3x3x(C=..)xF: fan_in = 3*3*C... here a Dense (300, 200) kernel
    values = nn.initializers.get(name)((300, 200), np.random.default_rng(0))
    assert values.dtype == np.float32
    assert abs(values.mean()) < 0.01 * expected_std * 10
    np.testing.assert_allclose(values.std(), expected_std, rtol=0.03)


def test_conv_fans_count_the_receptive_field():
    values = nn.initializers.he_uniform((5, 5, 4, 50), np.random.default_rng(0))
    assert np.abs(values).max() <= np.sqrt(6 / (5 * 5 * 4))
    np.testing.assert_allclose(values.std(), np.sqrt(2 / 100), rtol=0.05)


def test_regularizers_penalty_and_gradient(rng):
    w = rng.normal(0, 1, (4, 3))
    reg = nn.L1L2(l1=0.1, l2=0.2)
    assert reg(w) == pytest.approx(0.1 * np.abs(w).sum() + 0.2 * (w ** 2).sum())
    np.testing.assert_allclose(reg.gradient(w), 0.1 * np.sign(w) + 0.4 * w)
    assert nn.L2(0.5)(np.array([2.0])) == pytest.approx(2.0)
    assert nn.L1(0.5)(np.array([-2.0])) == pytest.approx(1.0)
