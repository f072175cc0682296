"""Optimizers against their update rules written out by hand (papers' notation), a few steps
each, plus schedules and state round trips."""
import math

import numpy as np
import pytest

from cnnx import optim

GRADS = [np.array([0.5, -1.5, 2.0]), np.array([-0.3, 0.8, 1.0]), np.array([1.2, 0.1, -2.5]),
         np.array([0.0, -0.4, 0.7])]
START = np.array([1.0, -2.0, 0.5])


def run(optimizer, steps=len(GRADS)):
    params = {"dense/kernel": START.copy()}
    for grad in GRADS[:steps]:
        optimizer.apply(params, {"dense/kernel": grad})
    return params["dense/kernel"]


def by_hand(rule):
    """Apply rule(theta, g, t, state) per element in plain Python floats."""
    result = []
    for i, theta in enumerate(START):
        state = {}
        for t, grad in enumerate(GRADS, start=1):
            theta = rule(theta, float(grad[i]), t, state)
        result.append(theta)
    return np.array(result)


def sgd(theta, g, t, s, lr=0.1):
    return theta - lr * g


def momentum(theta, g, t, s, lr=0.1, mu=0.9):
    s["v"] = mu * s.get("v", 0.0) - lr * g
    return theta + s["v"]


def nesterov(theta, g, t, s, lr=0.1, mu=0.9):
    s["v"] = mu * s.get("v", 0.0) - lr * g
    return theta + mu * s["v"] - lr * g


def adagrad(theta, g, t, s, lr=0.1, eps=1e-7):
    s["a"] = s.get("a", 0.1) + g * g
    return theta - lr * g / (math.sqrt(s["a"]) + eps)


def adadelta(theta, g, t, s, lr=1.0, rho=0.95, eps=1e-6):
    s["eg"] = rho * s.get("eg", 0.0) + (1 - rho) * g * g
    delta = math.sqrt(s.get("ed", 0.0) + eps) / math.sqrt(s["eg"] + eps) * g
    s["ed"] = rho * s.get("ed", 0.0) + (1 - rho) * delta * delta
    return theta - lr * delta


def rmsprop(theta, g, t, s, lr=0.01, rho=0.9, eps=1e-7):
    s["v"] = rho * s.get("v", 0.0) + (1 - rho) * g * g
    return theta - lr * g / (math.sqrt(s["v"]) + eps)


def adam(theta, g, t, s, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """Kingma & Ba 2015, Algorithm 1."""
    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    m_hat, v_hat = s["m"] / (1 - b1 ** t), s["v"] / (1 - b2 ** t)
    return theta - lr * m_hat / (math.sqrt(v_hat) + eps)


def adamax(theta, g, t, s, lr=0.02, b1=0.9, b2=0.999, eps=1e-7):
    """Kingma & Ba 2015, Algorithm 2 (epsilon in the denominator, as Keras)."""
    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
    s["u"] = max(b2 * s.get("u", 0.0), abs(g))
    return theta - (lr / (1 - b1 ** t)) * s["m"] / (s["u"] + eps)


def nadam(theta, g, t, s, lr=0.01, b1=0.9, b2=0.999, eps=1e-7):
    """Dozat 2016 with the 0.96^(t/250) momentum schedule (Keras' Nadam)."""
    mu = lambda k: b1 * (1 - 0.5 * 0.96 ** (k / 250))  # noqa: E731
    s["prod"] = s.get("prod", 1.0) * mu(t)
    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    m_hat = mu(t + 1) * s["m"] / (1 - s["prod"] * mu(t + 1)) + (1 - mu(t)) * g / (1 - s["prod"])
    return theta - lr * m_hat / (math.sqrt(s["v"] / (1 - b2 ** t)) + eps)


CASES = [
    (lambda: optim.SGD(0.1), sgd),
    (lambda: optim.SGD(0.1, momentum=0.9), momentum),
    (lambda: optim.Momentum(0.1, 0.9), momentum),
    (lambda: optim.SGD(0.1, momentum=0.9, nesterov=True), nesterov),
    (lambda: optim.Nesterov(0.1, 0.9), nesterov),
    (lambda: optim.Adagrad(0.1), adagrad),
    (lambda: optim.Adadelta(), adadelta),
    (lambda: optim.RMSprop(0.01), rmsprop),
    (lambda: optim.Adam(0.01, epsilon=1e-8), adam),
    (lambda: optim.AdaMax(0.02), adamax),
    (lambda: optim.Nadam(0.01), nadam),
]


@pytest.mark.parametrize("make, rule", CASES, ids=lambda case: getattr(case, "__name__", ""))
def test_elementwise_optimizers_match_hand_computed_updates(make, rule):
    np.testing.assert_allclose(run(make()), by_hand(rule), rtol=1e-12, atol=1e-14)


def test_adam_first_step_moves_each_weight_by_the_learning_rate():
    # Kingma & Ba, section 2.1: |step| ~ alpha at t = 1 whatever the gradient's scale
    params = {"w": np.array([0.0, 0.0])}
    optim.Adam(0.01, epsilon=0.0).apply(params, {"w": np.array([1e-4, -300.0])})
    np.testing.assert_allclose(params["w"], [-0.01, 0.01], rtol=1e-12)


def test_lars_matches_the_papers_algorithm():
    """You, Gitman & Ginsburg 2017, Algorithm 1, with one trust ratio for the whole tensor."""
    lr, mu, beta, eta = 0.5, 0.9, 0.01, 0.002
    w, v = START.copy(), np.zeros(3)
    for g in GRADS:
        local_lr = eta * np.linalg.norm(w) / (np.linalg.norm(g) + beta * np.linalg.norm(w))
        v = mu * v + lr * local_lr * (g + beta * w)
        w = w - v
    got = run(optim.LARS(lr, momentum=mu, weight_decay=beta, eta=eta))
    np.testing.assert_allclose(got, w, rtol=1e-12)


def test_lars_falls_back_to_the_global_rate_for_zero_weights():
    params = {"b": np.zeros(2)}
    optim.LARS(0.1, momentum=0.0, weight_decay=0.0).apply(params, {"b": np.array([1.0, -2.0])})
    np.testing.assert_allclose(params["b"], [-0.1, 0.2])


@pytest.mark.parametrize("make", [case[0] for case in CASES] + [lambda: optim.LARS(0.1)])
def test_state_dict_round_trip_continues_identically(make, tmp_path):
    original = make()
    params = {"a/kernel": START.copy(), "b/bias": START[:2].copy()}
    for grad in GRADS[:2]:
        original.apply(params, {"a/kernel": grad, "b/bias": grad[:2]})
    np.savez(tmp_path / "state.npz", **original.state_dict())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as saved:
        state = dict(saved)
    clone = optim.get(original.get_config())
    clone.load_state_dict(state)
    params_clone = {k: v.copy() for k, v in params.items()}
    for grad in GRADS[2:]:
        original.apply(params, {"a/kernel": grad, "b/bias": grad[:2]})
        clone.apply(params_clone, {"a/kernel": grad, "b/bias": grad[:2]})
    for name in params:
        np.testing.assert_array_equal(params[name], params_clone[name])
    assert int(state["iterations"]) == 2


def test_schedules():
    assert optim.Constant(0.1)(1000) == 0.1
    step = optim.StepDecay(1.0, step_size=10, gamma=0.5)
    assert [step(0), step(9), step(10), step(25)] == [1.0, 1.0, 0.5, 0.25]
    cosine = optim.CosineDecay(1.0, decay_steps=100, alpha=0.1)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(100) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.1)


def test_optimizer_uses_the_schedule_per_step():
    params = {"w": np.array([0.0])}
    sgd = optim.SGD(optim.StepDecay(1.0, step_size=1, gamma=0.5))
    for _ in range(3):
        sgd.apply(params, {"w": np.array([1.0])})
    np.testing.assert_allclose(params["w"], [-(1 + 0.5 + 0.25)])
    assert optim.get(sgd.get_config()).learning_rate(2) == 0.25


def test_optimizer_refuses_unknown_parameters_and_shapes():
    with pytest.raises(KeyError, match="unknown parameters"):
        optim.SGD().apply({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match=r"gradient for 'a' is \(3,\), parameter is \(2,\)"):
        optim.SGD().apply({"a": np.zeros(2)}, {"a": np.zeros(3)})
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.get("adamw")


def test_a_schedule_that_cannot_be_saved_is_refused_not_frozen():
    optimizer = optim.SGD(learning_rate=lambda step: 0.1 / (1 + step))
    with pytest.raises(ValueError, match="has no get_config\\(\\), so it cannot be saved"):
        optimizer.get_config()
    assert optim.SGD(optim.CosineDecay(0.1, 100)).get_config()["learning_rate"]["name"] == \
        "CosineDecay"


@pytest.mark.parametrize("name, cls, momentum", [("momentum", optim.SGD, 0.9),
                                                 ("Nesterov", optim.SGD, 0.9),
                                                 ("adam", optim.Adam, None)])
def test_get_builds_named_optimizers_with_options(name, cls, momentum):
    optimizer = optim.get(name, learning_rate=0.05)
    assert type(optimizer) is cls
    assert optimizer.learning_rate(0) == pytest.approx(0.05)
    if momentum is not None:
        assert optimizer.momentum == momentum
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        optim.get("adamw")
