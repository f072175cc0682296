"""BatchNormalization fused with the ReLU layer after it: the same results as the two layers
apart (bit for bit, any thread count, both ISAs), float64 gradients by finite differences,
and no pass left in the ReLU layer."""
import pickle

import numpy as np
import pytest
from reference import assert_same_step, numerical_gradient, step_results

import cnnx
from cnnx import _kernels, architectures, nn
from cnnx.nn.normalization import fuse_batchnorm_relu

ISAS = ["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]


def comics_bn(fused, input_shape=(22, 21, 1)):
    """The comics BatchNorm net as Sequential builds it (fused), or with both pairs taken
    apart again into a plain BatchNormalization and a ReLU layer (the reference)."""
    model = architectures.comics_bn_dropout(input_shape)
    model.compile("adam")
    pairs = [(layer, following) for layer, following in zip(model.layers, model.layers[1:])
             if isinstance(layer, nn.BatchNormalization)]
    assert len(pairs) == 2 and all(batchnorm.fused_relu for batchnorm, _ in pairs)
    assert all(isinstance(relu.activation, nn.activations.FusedReLU) for _, relu in pairs)
    if not fused:
        for batchnorm, relu in pairs:
            batchnorm.fused_relu = False
            relu.activation = nn.activations.ReLU()
    return model


@pytest.mark.parametrize("isa", ISAS)
def test_fused_model_gives_the_unfused_bits_for_any_thread_count(isa, rng):
    x = rng.standard_normal((6, 22, 21, 1)).astype(np.float32) * 2 + 1
    y = rng.integers(0, 2, 6)
    _kernels.set_isa(isa)
    try:
        with cnnx.num_threads(1):
            expected = step_results(comics_bn(fused=False), x, y)
        for n_threads in (1, 2, 3):
            with cnnx.num_threads(n_threads):
                got = step_results(comics_bn(fused=True), x, y)
            assert_same_step(got, expected, (isa, n_threads))
    finally:
        _kernels.set_isa("auto")


def test_relu_after_a_fused_batchnorm_does_no_pass_of_its_own(rng):
    batchnorm, relu = nn.BatchNormalization(), nn.ReLU()
    assert batchnorm.fuse_following_relu(relu)
    batchnorm.build((5, 4, 8), rng)
    x = rng.standard_normal((3, 5, 4, 8)).astype(np.float32)
    y = batchnorm.forward(x, training=True)
    assert (y >= 0).all() and (y == 0).any()
    assert relu.forward(y, training=True) is y              # no copy, no pass
    grad = rng.standard_normal(y.shape).astype(np.float32)
    assert relu.backward(grad) is grad
    grad_input = batchnorm.backward(grad.copy())
    unfused_batchnorm, unfused_relu = nn.BatchNormalization(), nn.ReLU()
    unfused_batchnorm.build((5, 4, 8), rng)
    expected = unfused_relu.forward(unfused_batchnorm.forward(x, training=True), training=True)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(
        grad_input, unfused_batchnorm.backward(unfused_relu.backward(grad.copy())))


@pytest.mark.parametrize("following", [lambda: nn.LeakyReLU(0.1), lambda: nn.Softmax(),
                                       lambda: nn.Dense(3), lambda: nn.MaxPool2D(2),
                                       lambda: nn.Activation("tanh")],
                         ids=["leaky_relu", "softmax", "dense", "max_pool", "tanh"])
def test_only_a_relu_layer_is_fused(following):
    batchnorm, layer = nn.BatchNormalization(), following()
    activation = getattr(layer, "activation", None)
    assert not batchnorm.fuse_following_relu(layer)
    assert not batchnorm.fuse_following_relu(None)
    assert batchnorm.fused_relu is False and getattr(layer, "activation", None) is activation


def test_activation_relu_layer_is_fused_too():
    model = nn.Sequential([nn.Conv2D(2, 3), nn.BatchNormalization(), nn.Activation("relu"),
                           nn.BatchNormalization(), nn.Flatten(), nn.Dense(2)],
                          input_shape=(6, 6, 1))
    assert model.layers[1].fused_relu and not model.layers[3].fused_relu   # Sequential fused it
    assert fuse_batchnorm_relu(model.layers) == 0                         # and only once


def test_fused_pair_gradients_match_finite_differences_in_float64(rng):
    batchnorm, relu = nn.BatchNormalization(momentum=0.9), nn.ReLU()
    assert batchnorm.fuse_following_relu(relu)
    batchnorm.build((4, 3, 5), rng)
    batchnorm.params = {"gamma": rng.normal(1, 0.5, 5), "beta": rng.normal(0, 0.5, 5)}
    x = rng.normal(0, 1, (3, 4, 3, 5))
    weights = rng.normal(0, 1, x.shape)                     # loss = sum(relu(bn(x)) * weights)

    def loss():
        return float((relu.forward(batchnorm.forward(x, training=True), training=True)
                      * weights).sum())

    y = relu.forward(batchnorm.forward(x, training=True), training=True)
    assert y.dtype == np.float64 and (y == 0).mean() > 0.2   # the mask matters
    grad_input = batchnorm.backward(relu.backward(weights.copy()))
    analytic = {name: grad.copy() for name, grad in batchnorm.grads.items()}

    for name, param in batchnorm.params.items():
        np.testing.assert_allclose(analytic[name], numerical_gradient(loss, param, range(param.size)),
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    index = rng.choice(x.size, size=20, replace=False)
    np.testing.assert_allclose(grad_input.flat[index], numerical_gradient(loss, x, index), rtol=1e-5, atol=1e-7)


def test_fused_model_survives_pickling_and_keeps_its_config(rng):
    fused, plain = comics_bn(fused=True), comics_bn(fused=False)
    assert [layer.get_config() for layer in fused.layers] == \
        [layer.get_config() for layer in plain.layers]      # fusion is not configuration
    clone = pickle.loads(pickle.dumps(fused))
    assert clone.layers[1].fused_relu and isinstance(clone.layers[2].activation,
                                                     nn.activations.FusedReLU)
    x = rng.standard_normal((2, 22, 21, 1)).astype(np.float32)
    np.testing.assert_array_equal(clone.predict(x), plain.predict(x))


@pytest.mark.parametrize("fused", [False, True])
def test_a_strided_input_takes_the_numpy_path_both_ways(rng, fused):
    # a float32 input that is not C-contiguous trains on NumPy; its backward must too: the
    # kernels' backward would read the ReLU mask of an earlier batch (or none at all)
    layer = nn.BatchNormalization()
    layer.build((4, 3, 5), rng)
    relu = nn.ReLU()
    if fused:
        assert layer.fuse_following_relu(relu)
    layer.forward(rng.standard_normal((2, 4, 3, 5)).astype(np.float32) + 3, training=True)
    x = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)[:, :, ::2]
    grad = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    y = layer.forward(x, training=True)
    dx = layer.backward(grad.copy())               # the NumPy backward overwrites its input
    reference = nn.BatchNormalization()
    reference.build((4, 3, 5), rng)
    y_ref = reference.forward(np.ascontiguousarray(x).astype(np.float64), training=True)
    g = grad.astype(np.float64)
    if fused:
        y_ref, g = np.maximum(y_ref, 0), g * (y_ref > 0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, reference.backward(g), rtol=1e-3, atol=1e-4)
