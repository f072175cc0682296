"""The networks of the papers cnnx follows, by name, for any input shape and class count."""
from cnnx import nn


def glasses(input_shape=(80, 80, 3), n_classes=2, seed=0):
    """INPUT -> [CONV -> RELU]*3 -> POOL -> [FC -> RELU -> DROPOUT]*2 -> FC -> SOFTMAX (6.57 M at 80x80x3)."""
    return nn.Sequential([
        nn.Conv2D(16, 3, padding="same", activation="relu"),
        nn.Conv2D(16, 3, padding="same", activation="relu"),
        nn.Conv2D(32, 3, padding="same", activation="relu"),
        nn.MaxPool2D(2),
        nn.Flatten(),
        nn.Dense(128, activation="relu"), nn.Dropout(0.5),
        nn.Dense(128, activation="relu"), nn.Dropout(0.5),
        nn.Dense(n_classes, activation="softmax"),
    ], input_shape=input_shape, seed=seed)


def comics(input_shape=(100, 100, 1), n_classes=2, seed=0):
    """[CONV32 -> POOL]*2 -> FC128 -> FC (the comics paper's base model, grey input)."""
    return nn.Sequential([
        nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Flatten(),
        nn.Dense(128, activation="relu"),
        nn.Dense(n_classes, activation="softmax"),
    ], input_shape=input_shape, seed=seed)


def comics_bn_dropout(input_shape=(100, 100, 1), n_classes=2, seed=0):
    """[CONV32 -> BN -> RELU -> POOL]*2 -> DROPOUT 0.25 -> FC128 -> DROPOUT 0.5 -> FC: the
    comics paper's "dropout + BatchNormalization" variant of its base model."""
    return nn.Sequential([
        nn.Conv2D(32, 3), nn.BatchNormalization(), nn.ReLU(), nn.MaxPool2D(2),
        nn.Conv2D(32, 3), nn.BatchNormalization(), nn.ReLU(), nn.MaxPool2D(2),
        nn.Flatten(), nn.Dropout(0.25),
        nn.Dense(128, activation="relu"), nn.Dropout(0.5),
        nn.Dense(n_classes, activation="softmax"),
    ], input_shape=input_shape, seed=seed)


def fashion(input_shape=(28, 28, 1), n_classes=10, seed=0):
    """CONV32 -> POOL -> CONV64 -> POOL -> FC128 -> FC (the Fashion-MNIST study's CNN)."""
    return nn.Sequential([
        nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(64, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Flatten(),
        nn.Dense(128, activation="relu"),
        nn.Dense(n_classes, activation="softmax"),
    ], input_shape=input_shape, seed=seed)


def small(input_shape=(25, 25, 1), n_classes=2, seed=0):
    """A small CNN for small images (the bundled faces set): trains in seconds on one core."""
    return nn.Sequential([
        nn.Conv2D(8, 3, padding="same", activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(16, 3, padding="same", activation="relu"), nn.MaxPool2D(2),
        nn.Flatten(),
        nn.Dense(32, activation="relu"), nn.Dropout(0.25),
        nn.Dense(n_classes, activation="softmax"),
    ], input_shape=input_shape, seed=seed)


ARCHITECTURES = {"glasses": glasses, "comics": comics, "comics_bn_dropout": comics_bn_dropout,
                 "fashion": fashion, "small": small}


def default_for(image_shape):
    """The named network that suits images of this shape (what `cnnx train` picks by itself)."""
    height, width, _ = image_shape
    if height * width <= 32 * 32:
        return "small" if height < 28 else "fashion"
    return "glasses" if height * width <= 90 * 90 else "comics"


def build(name, input_shape, n_classes, seed=0):
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r}; known: {known}, or a model/JSON file")
    return ARCHITECTURES[name](input_shape=tuple(input_shape), n_classes=n_classes, seed=seed)
