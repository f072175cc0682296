"""History, EarlyStopping, CSVLogger, ModelCheckpoint and the progress bar."""
import csv

import numpy as np
import pytest

from cnnx import nn, optim


@pytest.fixture
def data(rng):
    x = rng.normal(0, 1, (48, 4, 4, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64)
    return x, y


def make_model(learning_rate=0.05):
    model = nn.Sequential([nn.Flatten(), nn.Dense(2, activation="softmax")], input_shape=(4, 4, 1))
    model.compile(optim.SGD(learning_rate), "sparse_categorical_crossentropy", ["accuracy"])
    return model


def test_early_stopping_stops_after_patience_epochs_without_improvement(data):
    # a zero learning rate never improves the loss after the first epoch
    stopper = nn.EarlyStopping(monitor="loss", patience=2)
    history = make_model(0.0).fit(*data, epochs=20, callbacks=[stopper], verbose=0)
    assert len(history.history["loss"]) == 3          # 1 to set the best, 2 without progress
    assert stopper.stopped_epoch == 2


def test_early_stopping_restores_the_best_weights(data):
    model = make_model(0.5)
    stopper = nn.EarlyStopping(monitor="val_loss", patience=1, min_delta=1e9,
                               restore_best_weights=True)
    model.fit(*data, epochs=5, validation_split=0.25, callbacks=[stopper], verbose=0)
    after_first_epoch = make_model(0.5)
    x, y = data
    after_first_epoch.fit(x[:36], y[:36], epochs=1, verbose=0)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value, after_first_epoch.get_weights()[name])


def test_csv_logger_writes_one_row_per_epoch(data, tmp_path):
    path = tmp_path / "log.csv"
    history = make_model().fit(*data, epochs=3, validation_data=data,
                               callbacks=[nn.CSVLogger(path)], verbose=0)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert [float(row["val_loss"]) for row in rows] == pytest.approx(history.history["val_loss"])


def test_model_checkpoint_saves_loadable_models(data, tmp_path):
    pattern = str(tmp_path / "model-{epoch:02d}.npz")
    model = make_model()
    model.fit(*data, epochs=2, callbacks=[nn.ModelCheckpoint(pattern, monitor="loss")],
              verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-01.npz", "model-02.npz"]
    loaded = nn.load_model(tmp_path / "model-02.npz")
    np.testing.assert_array_equal(loaded.predict(data[0]), model.predict(data[0]))


def test_model_checkpoint_save_best_only(data, tmp_path):
    checkpoint = nn.ModelCheckpoint(tmp_path / "best.npz", monitor="loss", save_best_only=True)
    make_model(0.0).fit(*data, epochs=3, callbacks=[checkpoint], verbose=0)
    assert checkpoint.best < np.inf and (tmp_path / "best.npz").exists()


def test_progress_bar_shows_loss_accuracy_and_images_per_second(data, capsys):
    make_model().fit(*data, batch_size=16, epochs=1, verbose=1)
    err = capsys.readouterr().err
    assert "Epoch 1/1" in err and "loss=" in err and "accuracy=" in err and "images/s=" in err


def test_verbose_zero_is_silent(data, capsys):
    make_model().fit(*data, epochs=1, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
