"""Training reaches real accuracy on real data (Fashion-MNIST from Debian's IDX files, the
scikit-image faces).  Budgets are sized for CI on 2 cores."""
import numpy as np
import pytest

from cnnx import data, nn, optim


def fashion_cnn(seed=0):
    return nn.Sequential([
        nn.Conv2D(16, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Flatten(), nn.Dense(64, activation="relu"), nn.Dense(10, activation="softmax"),
    ], input_shape=(28, 28, 1), seed=seed)


def fashion_data():
    try:
        train, test = data.load_fashion_mnist()
    except FileNotFoundError as error:          # .ci/run installs dataset-fashion-mnist
        pytest.skip(str(error))
    scale = np.float32(1 / 255)
    return (train.images * scale, train.labels), (test.images * scale, test.labels)


@pytest.mark.slow
def test_fashion_mnist_reaches_088():
    """All 60,000 training images, 2 epochs (3,750 Adam steps, cosine-decayed from 3e-3),
    scored on all 10,000 test images.  Measured 0.8906 (seed 0), 22 s of training on the
    2-core dev machine when quiet; the issue's 0.88 leaves a margin of about 0.01.
    """
    (x, y), (x_test, y_test) = fashion_data()
    model = fashion_cnn()
    steps = 2 * -(-len(x) // 32)
    model.compile(optim.Adam(optim.CosineDecay(3e-3, steps)), "sparse_categorical_crossentropy",
                  ["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    _, accuracy = model.evaluate(x_test, y_test)
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
