"""Fused optimizer updates (csrc/optimizers.c) against their NumPy formulas.

Every update reads g = grad / divisor + l1 sign(param) + 2 l2 param: a summed gradient and
an L1L2 penalty go in as they are. Checked bit for bit against the float32 formula in the
kernel's order, for 1, 2 and 3 threads, on sizes that cut the 4096-float blocks oddly; and
each optimizer's C path against its float64 NumPy path."""
import tracemalloc

import numpy as np
import pytest

from cnnx import _kernels, nn, optim
from cnnx.nn.regularizers import L1L2

SIZES = [1, 7, 4097, 3 * 4096 + 13]
f = np.float32


def effective_gradient(grad, param, divisor, l1, l2):
    """The float32 gradient the kernels read, in their order."""
    g = grad / f(divisor)
    if l1 or l2:
        g = g + (np.sign(param) * f(l1) + param * f(2 * l2))
    return g


def arrays(rng, size, count):
    return [rng.standard_normal(size).astype(np.float32) for _ in range(count)]


def run_for_threads(kernel, inputs, *args, **options):
    """kernel(*copies of inputs, *args) for 1, 2, 3 threads -> the three sets of outputs."""
    runs = []
    for n_threads in (1, 2, 3):
        copies = [a.copy() for a in inputs]
        kernel(*copies, *args, **options, n_threads=n_threads)
        runs.append(copies)
    return runs


def assert_runs_equal(runs, expected):
    for run in runs:
        for got, want in zip(run, expected):
            np.testing.assert_array_equal(got, want)


TERMS = [dict(divisor=1, l1=0, l2=0), dict(divisor=13, l1=0, l2=0),
         dict(divisor=7, l1=0.01, l2=0.005), dict(divisor=1, l1=0, l2=0.02)]
TERM_IDS = ["mean", "sum", "sum+l1l2", "mean+l2"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
def test_adam_and_nadam_read_the_summed_regularized_gradient(size, terms, rng):
    param, grad, m = arrays(rng, size, 3)
    v = rng.random(size).astype(np.float32)
    for m_scale, grad_scale in ((1.0, 0.0), (0.8, 0.15)):          # Adam, then Nadam's
        g = effective_gradient(grad, param, **terms)
        m_new = m * f(0.9) + g * f(0.1)
        v_new = v * f(0.999) + (g * g) * f(1 - 0.999)
        numerator = m_new if grad_scale == 0 else m_new * f(m_scale) + g * f(grad_scale)
        expected = [param - numerator / (np.sqrt(v_new) + f(1e-7)) * f(1e-3), grad, m_new, v_new]
        runs = run_for_threads(_kernels.adam_update, [param, grad, m, v], 0.9, 0.1, 0.999,
                               1 - 0.999, 1e-3, 1e-7, m_scale=m_scale, grad_scale=grad_scale,
                               **terms)
        assert_runs_equal(runs, expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
def test_rmsprop_and_adagrad_read_the_summed_regularized_gradient(size, terms, rng):
    param, grad = arrays(rng, size, 2)
    square = rng.random(size).astype(np.float32)
    for decay, weight in ((0.9, 0.1), (1.0, 1.0)):
        g = effective_gradient(grad, param, **terms)
        s = square * f(decay) + (g * g) * f(weight)
        expected = [param - g / (np.sqrt(s) + f(1e-7)) * f(0.01), grad, s]
        runs = run_for_threads(_kernels.rmsprop_update, [param, grad, square], decay, weight,
                               0.01, 1e-7, **terms)
        assert_runs_equal(runs, expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
def test_adamax_reads_the_summed_regularized_gradient(size, terms, rng):
    param, grad, m = arrays(rng, size, 3)
    u = rng.random(size).astype(np.float32)
    g = effective_gradient(grad, param, **terms)
    m_new = m * f(0.9) + g * f(0.1)
    u_new = np.maximum(u * f(0.999), np.abs(g))
    expected = [param - m_new / (u_new + f(1e-7)) * f(0.02), grad, m_new, u_new]
    runs = run_for_threads(_kernels.adamax_update, [param, grad, m, u], 0.9, 0.1, 0.999, 0.02,
                           1e-7, **terms)
    assert_runs_equal(runs, expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
def test_adadelta_update_is_zeilers_rule_in_float32(size, terms, rng):
    param, grad = arrays(rng, size, 2)
    mean_grad, mean_delta = (rng.random(size).astype(np.float32) for _ in range(2))
    g = effective_gradient(grad, param, **terms)
    eg = mean_grad * f(0.95) + (g * g) * f(0.05)
    delta = np.sqrt(mean_delta + f(1e-6)) / np.sqrt(eg + f(1e-6)) * g
    ed = mean_delta * f(0.95) + (delta * delta) * f(0.05)
    expected = [param - delta * f(1.0), grad, eg, ed]
    runs = run_for_threads(_kernels.adadelta_update, [param, grad, mean_grad, mean_delta], 0.95,
                           0.05, 1.0, 1e-6, **terms)
    assert_runs_equal(runs, expected)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
def test_sgd_reads_the_summed_regularized_gradient(momentum, nesterov, terms, rng):
    size = 2 * 4096 + 3
    param, grad, velocity = arrays(rng, size, 3)
    step = effective_gradient(grad, param, **terms) * f(0.01)
    if momentum == 0:
        expected = [param - step, grad, velocity]
    else:
        v = velocity * f(momentum) - step
        expected = [(param - step) + v * f(momentum) if nesterov else param + v, grad, v]
    runs = []
    for n_threads in (1, 2, 3):
        p, v_run = param.copy(), velocity.copy()
        _kernels.sgd_update(p, grad, None if momentum == 0 else v_run, 0.01, momentum,
                            nesterov, **terms, n_threads=n_threads)
        runs.append([p, grad, v_run])
    assert_runs_equal(runs, expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
def test_lars_norms_and_update(size, terms, rng):
    param, grad, velocity = arrays(rng, size, 3)
    g = effective_gradient(grad, param, **terms)
    norms = {_kernels.lars_norms(param, grad, **terms, n_threads=n) for n in (1, 2, 3)}
    assert len(norms) == 1                                  # the same bits for any threads
    (weight_norm, grad_norm), = norms
    np.testing.assert_allclose(weight_norm, np.linalg.norm(param.astype(np.float64)),
                               rtol=1e-12)
    np.testing.assert_allclose(grad_norm, np.linalg.norm(g.astype(np.float64)), rtol=1e-12)
    v = velocity * f(0.9) + (g + param * f(5e-4)) * f(0.003)
    runs = run_for_threads(_kernels.lars_update, [param, grad, velocity], 0.9, 5e-4, 0.003,
                           **terms)
    assert_runs_equal(runs, [param - v, grad, v])


def test_updates_refuse_a_bad_divisor_or_penalty():
    param, grad, velocity = (np.zeros(5, np.float32) for _ in range(3))
    with pytest.raises(ValueError, match="sgd_update: divisor must be positive"):
        _kernels.sgd_update(param, grad, velocity, 0.1, 0.9, False, divisor=0)
    with pytest.raises(ValueError, match="lars_update: l1 and l2 must be non-negative"):
        _kernels.lars_update(param, grad, velocity, 0.9, 0.0, 0.1, l2=-1)
    with pytest.raises(ValueError, match=r"adadelta_update: mean_delta must have shape \(5\)"):
        _kernels.adadelta_update(param, grad, velocity, np.zeros(4, np.float32), 0.9, 0.1,
                                 1.0, 1e-6)


OPTIMIZERS = {
    "sgd": lambda: optim.SGD(0.1), "momentum": lambda: optim.SGD(0.1, 0.9),
    "nesterov": lambda: optim.SGD(0.1, 0.9, nesterov=True),
    "adagrad": lambda: optim.Adagrad(1e-2), "adadelta": lambda: optim.Adadelta(1.0),
    "rmsprop": lambda: optim.RMSprop(1e-2), "adam": lambda: optim.Adam(1e-2),
    "adamax": lambda: optim.AdaMax(1e-2), "nadam": lambda: optim.Nadam(1e-2),
    "lars": lambda: optim.LARS(0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_in_c_agrees_with_its_float64_path(name, rng):
    """float32 goes through C, float64 through NumPy: the same maths, summed gradients and
    penalties included."""
    shapes = {"conv/kernel": (3, 3, 5, 7), "dense/bias": (4099,)}
    params32 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params64 = {k: p.astype(np.float64) for k, p in params32.items()}
    regularizers = {"conv/kernel": L1L2(1e-3, 2e-3)}
    fused, reference = OPTIMIZERS[name](), OPTIMIZERS[name]()
    for _ in range(5):
        grads = {k: 9 * rng.standard_normal(s) for k, s in shapes.items()}   # a sum over 9
        fused.apply(params32, {k: g.astype(np.float32) for k, g in grads.items()}, 9,
                    regularizers)
        reference.apply(params64, grads, 9, regularizers)
    for key in shapes:
        np.testing.assert_allclose(params32[key], params64[key], rtol=2e-5, atol=2e-5)
    for slot, table in fused.slots.items():
        for key, value in table.items():
            np.testing.assert_allclose(value, reference.slots[slot][key], rtol=1e-4, atol=1e-5)


def regularized_model(optimizer):
    model = nn.Sequential([nn.Conv2D(4, 3, activation="relu", kernel_regularizer=L1L2(0.01, 0.02)),
                           nn.Flatten(),
                           nn.Dense(300, activation="relu", kernel_regularizer="l2"),
                           nn.Dense(3, activation="softmax", bias_regularizer="l1")],
                          input_shape=(12, 12, 2), seed=1)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_apply_gradient_sum_equals_mean_gradients_plus_penalty(name, rng):
    """The sum and the penalty handed to the update give the bits the mean and the penalty
    arrays gave (what apply_gradients did before, and does for a mean)."""
    x = rng.standard_normal((11, 12, 12, 2)).astype(np.float32)
    y = rng.integers(0, 3, 11)
    by_sum, by_mean = regularized_model(OPTIMIZERS[name]()), regularized_model(OPTIMIZERS[name]())
    for step in range(3):
        total = by_sum.gradient(x, y, key=(0, step, 0))
        by_sum.apply_gradient_sum(total)
        mean = {k: g / np.float32(total.n_samples) for k, g in total.grads.items()}
        for key, penalty in by_mean.regularization_gradient().items():
            mean[key] = mean[key] + penalty
        by_mean.optimizer.apply(by_mean.params, mean)
    for key, value in by_sum.params.items():
        np.testing.assert_array_equal(value, by_mean.params[key])


def test_a_step_allocates_no_array_per_parameter(rng):
    """apply_gradient_sum reads the summed gradient and the penalty inside the C update: no
    mean or penalty arrays (the Dense kernel alone is 2.3 MB)."""
    model = regularized_model(optim.Adam(1e-3))
    x = rng.standard_normal((8, 12, 12, 2)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    model.train_step(x, y)                                  # the optimizer's slots exist now
    total = model.gradient(x, y, key=(0, 1, 0))
    tracemalloc.start()
    try:
        model.apply_gradient_sum(total)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"apply_gradient_sum allocated {peak} bytes at its peak"
