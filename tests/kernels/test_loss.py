"""Softmax cross-entropy in C (csrc/loss.c) against the float64 NumPy reference."""
import numpy as np
import pytest

from cnnx import _kernels, nn


def reference(logits, labels):
    """(loss sum, softmax - onehot) in float64, by log-sum-exp of the logits less their max."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_sum = np.logaddexp.reduce(z, axis=1)
    rows = np.arange(len(z))
    grad = np.exp(z - log_sum[:, None])
    grad[rows, labels] -= 1
    return float((log_sum - z[rows, labels]).sum()), grad


def run(logits, labels, n_threads):
    grad = np.full(logits.shape, np.nan, np.float32)
    loss = _kernels.softmax_cross_entropy(logits, labels, grad, n_threads=n_threads)
    return loss, grad


# (1, 1) and (7, 3): odd; (5000, 13): enough logits for the threaded loop
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (32, 10), (5000, 13)])
def test_softmax_cross_entropy_matches_float64_for_any_thread_count(shape, rng):
    logits = rng.normal(0, 3, shape).astype(np.float32)
    labels = rng.integers(0, shape[1], shape[0])
    expected_loss, expected_grad = reference(logits, labels)
    first_loss, first_grad = run(logits, labels, 1)
    assert first_loss == pytest.approx(expected_loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(first_grad, expected_grad, rtol=1e-6, atol=1e-7)
    for n_threads in (2, 3):
        loss, grad = run(logits, labels, n_threads)
        assert loss == first_loss
        np.testing.assert_array_equal(grad, first_grad)


def test_softmax_cross_entropy_at_extreme_logits_is_finite_and_exact():
    big = np.finfo(np.float32).max
    logits = np.array([[big, -big, 0.0],          # float32's whole range in one row
                       [-1e30, 1e30, 1e30],       # a tie far from zero
                       [88.8, -103.0, 89.0],      # exp overflows float32 unshifted
                       [-1e4, -1e4, -1e4]], np.float32)
    labels = np.array([1, 2, 0, 1])
    loss, grad = run(logits, labels, 1)
    z = logits.astype(np.float64)
    expected_rows = [2 * float(big), np.log(2), np.logaddexp.reduce(z[2]) - z[2, 0], np.log(3)]
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(sum(expected_rows), rel=1e-12)
    np.testing.assert_allclose(grad, reference(logits, labels)[1], rtol=1e-6, atol=1e-7)


def test_softmax_cross_entropy_refuses_labels_out_of_range():
    logits, grad = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must lie in \[0, 3\), "
                                         r"got 3 at row 1"):
        _kernels.softmax_cross_entropy(logits, np.array([0, 3]), grad)
    with pytest.raises(TypeError, match="softmax_cross_entropy: labels must be int64"):
        _kernels.softmax_cross_entropy(logits, np.array([0, 1], np.int32), grad)


def test_the_loss_takes_the_c_pass_for_float32_and_keeps_float64_as_reference(rng):
    logits = rng.normal(0, 4, (9, 5))
    labels = rng.integers(0, 5, 9)
    loss_fn = nn.SparseCategoricalCrossentropy()
    loss64, grad64 = loss_fn.from_logits(logits, labels)
    loss32, grad32 = loss_fn.from_logits(logits.astype(np.float32), labels)
    assert grad32.dtype == np.float32 and grad64.dtype == np.float64
    c_loss, c_grad = run(logits.astype(np.float32), labels, 1)
    assert loss32 == c_loss
    np.testing.assert_array_equal(grad32, c_grad)
    assert loss32 == pytest.approx(loss64, rel=1e-6)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-5, atol=1e-6)
