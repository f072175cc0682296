"""Losses return sums; fused (logits) and unfused (probabilities) paths agree and are stable."""
import math
import re

import numpy as np
import pytest

from cnnx import nn
from cnnx.nn.activations import sigmoid, softmax


def test_sparse_categorical_crossentropy_by_hand():
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    y = np.array([2, 0])
    loss, grad = nn.SparseCategoricalCrossentropy().from_logits(logits, y)
    expected = (-math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
                - math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-1) + math.exp(0))))
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, softmax(logits) - np.eye(3)[y], rtol=1e-12)


def test_sparse_categorical_crossentropy_fused_equals_unfused(rng):
    logits = rng.normal(0, 2, (5, 4))
    y = rng.integers(0, 4, 5)
    loss_fn = nn.SparseCategoricalCrossentropy()
    fused_loss, grad_logits = loss_fn.from_logits(logits, y)
    p = softmax(logits)
    loss, grad_p = loss_fn(p, y)
    assert loss == pytest.approx(fused_loss, rel=1e-10)
    # chain rule through softmax gives the fused p - y
    np.testing.assert_allclose(nn.activations.Softmax().backward(p, grad_p), grad_logits,
                               rtol=1e-8, atol=1e-12)


def test_binary_crossentropy_by_hand_and_fused_equals_unfused(rng):
    z = np.array([[0.3], [-1.2], [2.0]])
    y = np.array([1, 0, 0])
    loss_fn = nn.BinaryCrossentropy()
    loss, grad = loss_fn.from_logits(z, y)
    p = 1 / (1 + np.exp(-z[:, 0]))
    expected = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(1 - p[2]))
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad[:, 0], p - y, rtol=1e-12)
    unfused, grad_p = loss_fn(sigmoid(z), y)
    assert unfused == pytest.approx(loss, rel=1e-10)
    np.testing.assert_allclose(nn.activations.Sigmoid().backward(sigmoid(z), grad_p), grad,
                               rtol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_are_finite_and_exact_at_extreme_logits(dtype):
    logits = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype)
    loss, grad = nn.SparseCategoricalCrossentropy().from_logits(logits, np.array([1, 1]))
    assert loss == pytest.approx(2000.0)          # the wrong row costs its logit gap
    assert np.all(np.isfinite(grad))
    z = np.array([[1000.0], [-1000.0], [1000.0]], dtype)
    loss, grad = nn.BinaryCrossentropy().from_logits(z, np.array([0, 1, 1]))
    assert loss == pytest.approx(2000.0)
    np.testing.assert_allclose(grad[:, 0], [1, -1, 0])


def test_losses_return_sums_not_means(rng):
    logits = rng.normal(0, 1, (6, 3))
    y = rng.integers(0, 3, 6)
    loss_fn = nn.SparseCategoricalCrossentropy()
    whole = loss_fn.from_logits(logits, y)[0]
    halves = loss_fn.from_logits(logits[:3], y[:3])[0] + loss_fn.from_logits(logits[3:], y[3:])[0]
    assert whole == pytest.approx(halves, rel=1e-12)


@pytest.mark.parametrize("labels, match", [(np.array([0, 3]), r"\[0, 3\).*max 3"),
                                           (np.array([-1, 0]), r"min -1"),
                                           (np.array([0.5, 1.0]), "integer"),
                                           (np.array([[0], [1]]), r"shape \(N,\)")])
def test_sparse_categorical_crossentropy_refuses_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        nn.SparseCategoricalCrossentropy().check_labels(labels, 3, "test")


def test_binary_crossentropy_refuses_bad_labels_and_outputs():
    loss = nn.BinaryCrossentropy()
    with pytest.raises(ValueError, match="must be 0 or 1"):
        loss.check_labels(np.array([0, 2]), 1, "test")
    with pytest.raises(ValueError, match="1 output unit, got 2"):
        loss.check_labels(np.array([0, 1]), 2, "test")


@pytest.mark.parametrize("loss", [nn.SparseCategoricalCrossentropy(), nn.BinaryCrossentropy()],
                         ids=lambda loss: loss.name)
@pytest.mark.parametrize("labels", [np.array([0, 1], dtype=object), np.array(["0", "1"]),
                                    np.array([b"0", b"1"])], ids=["object", "str", "bytes"])
def test_non_numeric_labels_get_a_type_error_naming_their_dtype(loss, labels):
    # object labels used to end in "TypeError: ufunc 'isfinite' not supported"
    with pytest.raises(TypeError, match=f"test: {loss.name} expects numeric labels .*got an "
                                        f"array of dtype {re.escape(str(labels.dtype))}"):
        loss.check_labels(labels, 3 if loss.name.startswith("sparse") else 1, "test")
