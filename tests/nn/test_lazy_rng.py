"""Sequential.gradient's generator is made on first use, and draws what default_rng draws."""
import numpy as np

from cnnx import nn
from cnnx.nn.lazy_rng import LazyRng


def test_lazy_rng_draws_what_default_rng_draws_and_only_when_asked():
    lazy = LazyRng((7, 1, 2, 3))
    assert lazy._generator is None
    drawn = lazy.integers(0, 2**64, size=4, dtype=np.uint64)
    again = np.random.default_rng((7, 1, 2, 3)).integers(0, 2**64, size=4, dtype=np.uint64)
    assert np.array_equal(drawn, again)


def test_gradient_dropout_mask_is_the_one_default_rng_of_seed_and_key_gives():
    model = nn.Sequential([nn.Flatten(), nn.Dense(16, activation="relu"), nn.Dropout(0.5),
                           nn.Dense(3, activation="softmax")], input_shape=(4, 4, 1), seed=5)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    model.gradient(x, y, key=(1, 2, 3))
    lazy_mask = model.layers[2]._keep.copy()
    model.forward(x, training=True, rng=np.random.default_rng((5, 1, 2, 3)))
    assert np.array_equal(lazy_mask, model.layers[2]._keep)
    assert 0 < lazy_mask.mean() < 1


def test_a_step_of_a_network_without_dropout_makes_no_generator(monkeypatch):
    # LazyRng exists so that networks that draw nothing pay for no Generator each step
    model = nn.Sequential([nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
                           nn.Dense(3, activation="softmax")], input_shape=(8, 8, 1))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 4)

    def refuse(*args, **kwargs):
        raise AssertionError("a Generator was made for a network that draws nothing")
    monkeypatch.setattr(np.random, "default_rng", refuse)
    model.train_step(x, y, key=(0, 1, 0))
