"""The training step's Python path: Dense goes straight to the kernels (checked at the Cython
boundary only), labels are checked and counted as lists for a batch and as arrays beyond,
and every shortcut gives the bits and messages of the path it replaces."""
import numpy as np
import pytest

from cnnx import architectures, ops, optim
from cnnx.nn import losses
from cnnx.nn.core import Dense


def dense_layer(units, in_features, activation=None, use_bias=True, seed=0):
    layer = Dense(units, activation=activation, use_bias=use_bias)
    layer.name = "dense"
    layer.input_shape = (in_features,)
    layer.output_shape = layer.build((in_features,), np.random.default_rng(seed))
    if use_bias:
        layer.params["bias"][...] = np.random.default_rng(seed + 1).normal(size=units)
    return layer


def test_a_training_step_calls_no_python_checked_dense_op(rng, monkeypatch):
    """The ops check their arguments in Python; a float32 step leaves that to the kernels."""
    model = architectures.build("fashion", (28, 28, 1), 10, seed=0)
    model.compile(optim.Adam(1e-3), "sparse_categorical_crossentropy")
    x = rng.random((8, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 8)

    def refuse(*args, **kwargs):
        raise AssertionError("a float32 training step went through ops' Python checks")
    monkeypatch.setattr(ops, "dense_forward", refuse)
    monkeypatch.setattr(ops, "dense_backward", refuse)
    result = model.train_step(x, y)
    assert np.isfinite(result.loss_sum) and set(result.grads) == set(model.params)


@pytest.mark.parametrize("activation, use_bias, need_input_grad",
                         [("relu", True, True), (None, False, True), ("softmax", True, False)])
def test_dense_on_the_kernels_equals_the_ops_bit_for_bit(rng, activation, use_bias,
                                                        need_input_grad):
    layer = dense_layer(5, 7, activation, use_bias)
    layer.need_input_grad = need_input_grad
    x = rng.normal(size=(6, 7)).astype(np.float32)
    grad_z = rng.normal(size=(6, 5)).astype(np.float32)
    kernel, bias = layer.params["kernel"], layer.params.get("bias")

    y = layer.forward(x, training=True)
    z = ops.dense_forward(x, kernel, bias, relu=activation == "relu")
    expected = z if activation != "softmax" else layer.activation.forward(z)
    assert y.tobytes() == expected.tobytes()

    grad_input = layer.backward_logits(grad_z.copy())
    want_input, want_kernel, want_bias = ops.dense_backward(x, kernel, grad_z,
                                                            need_input_grad=need_input_grad)
    assert layer.grads["kernel"].tobytes() == want_kernel.tobytes()
    if use_bias:
        assert layer.grads["bias"].tobytes() == want_bias.tobytes()
    if need_input_grad:
        assert grad_input.tobytes() == want_input.tobytes()
    else:
        assert grad_input is None and want_input is None


def test_dense_takes_what_the_kernels_refuse_through_the_ops(rng):
    """A strided input, a float64 one and a non-contiguous kernel still work, as before."""
    layer = dense_layer(4, 6)
    wide = rng.normal(size=(5, 12)).astype(np.float32)
    x = wide[:, ::2]                                         # not C-contiguous
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(layer.forward(x), layer.forward(np.ascontiguousarray(x)))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(layer.forward(x64), layer.forward(x), rtol=1e-5)
    layer.params["kernel"] = np.asfortranarray(layer.params["kernel"])
    np.testing.assert_array_equal(layer.forward(np.ascontiguousarray(x)),
                                  ops.dense_forward(x, layer.params["kernel"],
                                                    layer.params["bias"]))


def test_kernel_factors_are_kept_from_a_strided_gradient(rng):
    layer = dense_layer(4, 6)
    layer.kernel_grad_as_factors = True
    x = rng.normal(size=(5, 6)).astype(np.float32)
    grad_z = rng.normal(size=(4, 5)).astype(np.float32).T     # (5, 4), Fortran order
    layer.forward(x, training=True)
    grad_input = layer.backward_logits(grad_z)
    assert layer.grads["kernel"] is None
    kept_x, kept_grad_z = layer.kernel_factors
    assert kept_x is x and kept_grad_z.flags.c_contiguous
    np.testing.assert_array_equal(kept_grad_z, grad_z)
    want_input, _, want_bias = ops.dense_backward(x, layer.params["kernel"], grad_z)
    assert grad_input.tobytes() == want_input.tobytes()
    assert layer.grads["bias"].tobytes() == want_bias.tobytes()


SIZES = [1, losses._LIST_CHECK_SIZE, losses._LIST_CHECK_SIZE + 1]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.int64, np.float64])
def test_labels_are_checked_alike_as_a_list_and_as_an_array(size, dtype):
    loss = losses.SparseCategoricalCrossentropy()
    good = np.arange(size).astype(dtype) % 7
    checked = loss.check_labels(good, 7, "test")
    assert checked.dtype == np.int64 and (checked == good).all()
    too_large = good.copy()
    too_large[-1] = 7
    with pytest.raises(ValueError, match=r"test: labels must lie in \[0, 7\) .* max 7"):
        loss.check_labels(too_large, 7, "test")
    if np.dtype(dtype).kind != "u":
        negative = good.copy()
        negative[0] = -3
        with pytest.raises(ValueError, match=r"got min -3"):
            loss.check_labels(negative, 7, "test")


@pytest.mark.parametrize("size", SIZES)
def test_correct_predictions_are_counted_alike_as_lists_and_as_arrays(rng, size):
    loss = losses.SparseCategoricalCrossentropy()
    outputs = rng.random((size, 5)).astype(np.float32)
    outputs[::3, 1] = outputs[::3, 3] = 2.0                  # ties: the first index wins
    y = rng.integers(0, 5, size)
    counted = loss.n_correct(outputs, y)
    assert type(counted) is int
    assert counted == int((outputs.argmax(axis=-1) == y).sum())


def test_a_step_counts_the_outputs_of_its_own_forward(rng):
    """n_correct is taken before the backward now: it still counts the forward's outputs."""
    model = architectures.build("fashion", (28, 28, 1), 10, seed=0)
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy", ["accuracy"])
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    outputs = model.forward(x, training=True)
    y = outputs.argmax(axis=-1)
    y[::2] = (y[::2] + 1) % 10                               # half of them wrong
    assert model.gradient(x, y).n_correct == 32
