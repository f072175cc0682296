"""Training reaches real accuracy on real data (Fashion-MNIST from Debian's IDX files, the
scikit-image faces).  Budgets are sized for CI on 2 cores."""
import os
import time

import numpy as np
import pytest

from cnnx import data, nn, optim


def fashion_cnn(seed=0):
    return nn.Sequential([
        nn.Conv2D(16, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Flatten(), nn.Dense(64, activation="relu"), nn.Dense(10, activation="softmax"),
    ], input_shape=(28, 28, 1), seed=seed)


@pytest.fixture(scope="module")
def fashion():
    try:
        train, test = data.load_fashion_mnist()
    except FileNotFoundError as error:          # .ci/run installs dataset-fashion-mnist
        pytest.skip(str(error))
    scale = np.float32(1 / 255)
    return (train.images * scale, train.labels), (test.images * scale, test.labels)


@pytest.mark.slow
def test_fashion_mnist_subset_reaches_085(fashion):
    """The first 20,000 training images, 2 epochs (1,250 Adam steps, cosine-decayed), scored
    on all 10,000 test images.

    Threshold 0.85 for this CI budget (measured 0.8607, seed 0; a linear model gets ~0.84).
    The full-data run below measured 0.8876 after 3 epochs.
    """
    (x, y), (x_test, y_test) = fashion
    model = fashion_cnn()
    steps = 2 * 20000 // 32
    model.compile(optim.Adam(optim.CosineDecay(3e-3, steps)), "sparse_categorical_crossentropy",
                  ["accuracy"])
    history = model.fit(x[:20000], y[:20000], batch_size=32, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    _, accuracy = model.evaluate(x_test, y_test)
    assert accuracy >= 0.85


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CNNX_LONG_TESTS"),
                    reason="full Fashion-MNIST training: set CNNX_LONG_TESTS=1 (minutes)")
def test_fashion_mnist_full_reaches_088(fashion):
    (x, y), (x_test, y_test) = fashion
    model = fashion_cnn()
    model.compile(optim.Adam(2e-3), "sparse_categorical_crossentropy", ["accuracy"])
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test)
    print(f"fashion full: accuracy {accuracy:.4f} in {time.perf_counter() - start:.0f} s")
    assert accuracy >= 0.88


def test_faces_reach_095():
    faces = data.load_faces()
    x = faces.images.astype(np.float32) / 255           # (200, 25, 25, 1)
    y = faces.labels
    test = np.arange(len(x)) % 4 == 0                   # 25 faces + 25 non-faces held out
    model = nn.Sequential([
        nn.Conv2D(8, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(16, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Flatten(), nn.Dense(32, activation="relu"), nn.Dropout(0.25),
        nn.Dense(1, activation="sigmoid"),
    ], input_shape=(25, 25, 1), seed=0)
    model.compile(optim.Adam(3e-3), "binary_crossentropy", ["accuracy"])
    model.fit(x[~test], y[~test], batch_size=16, epochs=15, verbose=0)
    _, accuracy = model.evaluate(x[test], y[test])
    assert accuracy >= 0.95
