"""Checkpoints are cnnx archives: the same atomic writer and checked reader as model files,
behind the functions the trainer has always called."""
import os
import zipfile

import numpy as np
import pytest

from cnnx import nn, optim
from cnnx.parallel import checkpoint


def trained_model():
    model = nn.Sequential([nn.Conv2D(2, 3), nn.BatchNormalization(), nn.Flatten(),
                           nn.Dense(2, activation="softmax")], input_shape=(5, 5, 1), seed=3)
    model.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    model.fit(rng.normal(size=(8, 5, 5, 1)), np.arange(8) % 2, batch_size=4, verbose=0)
    return model


def test_meta_round_trips_any_json_able_dict(tmp_path):
    meta = {"epoch": 3, "step": 0, "seed": 0, "shards": 4, "batch_size": 64, "mode": "sync",
            "history": [{"loss": 0.71, "accuracy": 0.5}, {"loss": float("inf")}],
            "architecture": trained_model().get_config(),
            "optimizer": {"name": "Adam", "learning_rate": {"name": "Constant",
                                                            "learning_rate": 0.01}},
            "partial_epoch": {"loss_sum": np.float32(12.5), "n_correct": np.int64(40),
                              "seen": 64},
            "note": "ünïcode", "nothing": None, "flags": [True, False]}
    checkpoint.save_checkpoint(tmp_path, {}, {}, meta)
    _, _, loaded = checkpoint.load_checkpoint(tmp_path)
    expected = dict(meta, partial_epoch={"loss_sum": 12.5, "n_correct": 40, "seen": 64})
    assert loaded == expected
    assert type(loaded["partial_epoch"]["n_correct"]) is int


def test_weights_and_optimizer_state_round_trip_and_resume_a_model(tmp_path):
    model = trained_model()
    path = checkpoint.save_checkpoint(tmp_path, model.get_weights(),
                                      model.optimizer.state_dict(), {"epoch": 1})
    assert path == checkpoint.checkpoint_path(tmp_path)
    weights, optimizer_state, meta = checkpoint.load_checkpoint(tmp_path)
    resumed = nn.model_from_config(model.get_config())
    resumed.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy")
    resumed.set_weights(weights)
    resumed.optimizer.load_state_dict(optimizer_state)
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(resumed.get_weights()[key], value)
    assert int(optimizer_state["iterations"]) == model.optimizer.iterations == 2
    assert meta == {"epoch": 1}


def test_a_checkpoint_is_a_file_load_model_s_format_reader_accepts(tmp_path):
    # one writer for both: the checkpoint holds the same weights/ and optimizer/ entries
    model = trained_model()
    checkpoint.save_checkpoint(tmp_path, model.get_weights(), model.optimizer.state_dict(), {})
    model.save(tmp_path / "model.npz")
    with zipfile.ZipFile(checkpoint.checkpoint_path(tmp_path)) as saved, \
            zipfile.ZipFile(tmp_path / "model.npz") as model_file:
        arrays = {name for name in model_file.namelist() if "/" in name}
        assert {name for name in saved.namelist() if "/" in name} == arrays


def test_expected_weights_are_checked_before_reading(tmp_path):
    model = trained_model()
    checkpoint.save_checkpoint(tmp_path, model.get_weights(), {}, {"epoch": 0})
    other = nn.Sequential([nn.Flatten(), nn.Dense(2)], input_shape=(5, 5, 1))
    with pytest.raises(nn.ArchiveError, match=r"its weights do not match the model: missing "
                                              r"none, unexpected \['batch_normalization/beta'"):
        checkpoint.load_checkpoint(tmp_path, expected_weights={**other.params, **other.state})
    wider = nn.Sequential([nn.Conv2D(2, 3), nn.BatchNormalization(), nn.Flatten(),
                           nn.Dense(3)], input_shape=(5, 5, 1))
    with pytest.raises(nn.ArchiveError, match=r"weights 'dense/kernel' are float32 of shape "
                                              r"\(18, 2\); the model expects float32 of "
                                              r"shape \(18, 3\)"):
        checkpoint.load_checkpoint(tmp_path, expected_weights={**wider.params, **wider.state})
    same = {**model.params, **model.state}
    assert checkpoint.load_checkpoint(tmp_path, expected_weights=same)[2] == {"epoch": 0}


@pytest.mark.parametrize("damage", ["truncate", "text", "no meta", "meta not a dict", "pickle"])
def test_a_damaged_checkpoint_is_an_archive_error_naming_it(tmp_path, damage):
    model = trained_model()
    path = checkpoint.save_checkpoint(tmp_path, model.get_weights(), {}, {"epoch": 0})
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    elif damage == "text":
        open(path, "w").write("{}")
    elif damage == "no meta":
        np.savez(path, **{"weights/dense/kernel": np.zeros(2, np.float32)})
    elif damage == "meta not a dict":
        np.savez(path, meta=np.array("[1, 2]"))
    else:
        np.savez(path, meta=np.array("{}"), **{"weights/x": np.array([{}], dtype=object)})
    with pytest.raises(nn.ArchiveError, match=f"cannot load '{path}': "):
        checkpoint.load_checkpoint(tmp_path)


def test_a_failed_save_keeps_the_old_checkpoint_and_no_temporary(tmp_path):
    checkpoint.save_checkpoint(tmp_path, {"w": np.ones(2, np.float32)}, {}, {"epoch": 1})
    with pytest.raises(TypeError, match="object cannot be stored"):
        checkpoint.save_checkpoint(tmp_path, {"w": np.zeros(2, np.float32)}, {},
                                   {"epoch": object()})
    weights, _, meta = checkpoint.load_checkpoint(tmp_path)
    assert meta == {"epoch": 1} and weights["w"].tolist() == [1, 1]
    assert os.listdir(tmp_path) == [checkpoint.FILENAME]
    assert checkpoint.load_checkpoint(tmp_path / "none") is None
