"""Synthetic faces with and without glasses: deterministic, resumable, learnable."""
import numpy as np
import pytest

from cnnx import data


def test_draw_faces_is_deterministic_and_balanced():
    images, labels = data.draw_faces(np.random.default_rng((3, 0)), 300, (32, 24))
    again, again_labels = data.draw_faces(np.random.default_rng((3, 0)), 300, (32, 24))
    other, _ = data.draw_faces(np.random.default_rng((4, 0)), 300, (32, 24))
    assert images.shape == (300, 32, 24, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(images, other)
    assert 120 < labels.sum() < 180
    assert images.std() > 30                      # varied pictures, not flat colour


def logistic_regression_accuracy(images, labels, n_train):
    """Test accuracy of a logistic regression on 4x4-block-averaged pixels (plain NumPy)."""
    n, height, width, channels = images.shape
    features = images.reshape(n, height // 4, 4, width // 4, 4, channels)
    features = features.mean(axis=(2, 4), dtype=np.float32).reshape(n, -1)
    features -= features[:n_train].mean(axis=0)
    features /= features[:n_train].std(axis=0) + 1e-6
    target = labels.astype(np.float32)
    weights, bias = np.zeros(features.shape[1], np.float32), np.float32(0)
    for _ in range(150):
        logits = features[:n_train] @ weights + bias
        error = 1 / (1 + np.exp(-logits)) - target[:n_train]
        weights -= np.float32(0.5) * (features[:n_train].T @ error / n_train + 1e-3 * weights)
        bias -= np.float32(0.5) * error.mean()
    predicted = features[n_train:] @ weights + bias > 0
    return (predicted == labels[n_train:]).mean()


def test_synthetic_faces_are_learnable(tmp_path):
    data.make_synthetic(tmp_path / "s.zarr", 1100, image_size=(40, 40), seed=1)
    ds = data.open_dataset(tmp_path / "s.zarr")
    images, labels = ds.read(np.arange(len(ds)))
    accuracy = logistic_regression_accuracy(images, labels, n_train=800)
    assert accuracy > 0.62, accuracy               # chance is 0.5; 300 test images
    # and the labels are not the signal by accident: shuffled labels give chance
    shuffled = np.random.default_rng(0).permutation(labels)
    assert logistic_regression_accuracy(images, shuffled, n_train=800) < 0.6


def test_make_synthetic_store_and_attributes():
    summary = data.make_synthetic("memory://synth-attrs", 70, image_size=(16, 16), seed=2,
                                  chunk_size=32)
    ds = data.open_dataset("memory://synth-attrs")
    assert (len(ds), ds.image_shape, ds.n_chunks) == (70, (16, 16, 3), 3)
    assert ds.class_names == ("no_glasses", "glasses") and summary.n_images == 70
    images, labels = ds.read(np.arange(70))
    assert list(ds.counts) == np.bincount(labels, minlength=2).tolist()
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, pixels.std(axis=0), rtol=1e-5)
    # chunk i comes from its own generator: the store is made of draw_faces chunks
    first, first_labels = data.draw_faces(np.random.default_rng((2, 1)), 32, (16, 16))
    np.testing.assert_array_equal(ds.read_chunk(1)[0], first)
    np.testing.assert_array_equal(ds.read_chunk(1)[1], first_labels)


def test_interrupted_synthesis_resumes_in_parallel_to_the_same_store(tmp_path):
    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.make_synthetic(tmp_path / "a.zarr", 200, image_size=(12, 12), chunk_size=20,
                            progress=stop_after_two)
    with pytest.raises(ValueError, match="incomplete"):
        data.open_dataset(tmp_path / "a.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.make_synthetic(tmp_path / "a.zarr", 200, image_size=(12, 12), chunk_size=20,
                            seed=9)
    summary = data.make_synthetic(tmp_path / "a.zarr", 200, image_size=(12, 12),
                                  chunk_size=20, workers=2)
    assert summary.resumed_chunks == 2
    data.make_synthetic(tmp_path / "b.zarr", 200, image_size=(12, 12), chunk_size=20)
    resumed, fresh = data.open_dataset(tmp_path / "a.zarr"), data.open_dataset(tmp_path / "b.zarr")
    for a, b in zip(resumed.read(np.arange(200)), fresh.read(np.arange(200))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(resumed.mean, fresh.mean)
    assert resumed.counts == fresh.counts and "done" not in resumed.attrs


@pytest.mark.parametrize("arguments, error, message", [
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer, got 0"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size must be a positive integer, got float"),
    ({"n": -3}, ValueError, "n must be a positive integer, got -3"),
    ({"image_size": (0, 8)}, ValueError, "image_size must be a positive integer, got 0"),
    ({"image_size": 8}, ValueError, r"image_size must be \(height, width\)"),
])
def test_make_synthetic_refuses_bad_sizes_before_writing_anything(tmp_path, arguments, error,
                                                                   message):
    call = {"n": 10, "image_size": (8, 8), "chunk_size": 4, **arguments}
    with pytest.raises(error, match=message):
        data.make_synthetic(tmp_path / "s.zarr", call.pop("n"), **call)
    assert not (tmp_path / "s.zarr").exists()
