"""Open, read, normalise and split cnnx stores on disk and in memory."""
import pickle
import uuid

import numpy as np
import pytest
import zarr

from cnnx import data
from cnnx.data.store import DamagedStoreError, create_store


def random_images(rng, n, shape=(9, 7, 3)):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture(params=["disk", "file_url", "memory"])
def store(request, tmp_path):
    if request.param == "disk":
        return str(tmp_path / "s.zarr")
    if request.param == "file_url":
        return "file://" + str(tmp_path / "s.zarr")
    return f"memory://{uuid.uuid4().hex}"


def test_arrays_round_trip_through_a_store(store, rng):
    x, y = random_images(rng, 23), rng.integers(0, 3, 23)
    summary = data.ingest_arrays(x, y, store, class_names=["a", "b", "c"], chunk_size=5)
    ds = data.open_dataset(store)
    assert (len(ds), ds.image_shape, ds.chunk_size, ds.n_chunks) == (23, (9, 7, 3), 5, 5)
    assert ds.class_names == ("a", "b", "c") and summary.n_chunks == 5
    assert list(ds.counts) == np.bincount(y, minlength=3).tolist()
    chunks = [ds.read_chunk(i) for i in range(ds.n_chunks)]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), x)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), y)
    assert chunks[0][1].dtype == np.int64 and len(chunks[-1][0]) == 3
    order = np.array([22, 0, 7, 7, 13, 4])
    images, labels = ds.read(order)
    np.testing.assert_array_equal(images, x[order])
    np.testing.assert_array_equal(labels, y[order])


def test_statistics_are_per_channel_mean_and_std_of_the_pixels(tmp_path, rng):
    x = random_images(rng, 30)
    x[..., 1] //= 4
    data.ingest_arrays(x, np.zeros(30, int), tmp_path / "s.zarr", chunk_size=7)
    ds = data.open_dataset(tmp_path / "s.zarr")
    pixels = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, pixels.std(axis=0), rtol=1e-6)
    mean, std = data.channel_stats(x)                  # the same statistics, from arrays
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)


def test_normalize_modes(tmp_path, rng):
    x = random_images(rng, 40)
    data.ingest_arrays(x, np.zeros(40, int), tmp_path / "s.zarr")
    ds = data.open_dataset(tmp_path / "s.zarr")
    z = ds.normalize(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.reshape(-1, 3).mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.reshape(-1, 3).std(axis=0), 1, atol=1e-4)
    scaled = ds.normalize(x, "scale")
    assert scaled.min() >= 0 and scaled.max() <= 1 and scaled.dtype == np.float32
    np.testing.assert_allclose(scaled * 255, x, atol=1e-4)
    np.testing.assert_array_equal(ds.normalize(x, "none"), x)
    with pytest.raises(ValueError, match="mode must be one of"):
        ds.normalize(x, "zscore")
    with pytest.raises(TypeError, match="uint8"):
        ds.normalize(x.astype(np.float32))


def test_constant_channel_is_not_divided_by_zero():
    x = np.full((2, 3, 3, 1), 9, np.uint8)
    np.testing.assert_array_equal(data.normalize(x, "standardize", [9.0], [0.0]), 0)


def test_dataset_pickles_by_store_name(tmp_path, rng):
    x = random_images(rng, 10)
    data.ingest_arrays(x, np.arange(10) % 2, tmp_path / "s.zarr", chunk_size=4)
    ds = pickle.loads(pickle.dumps(data.open_dataset(tmp_path / "s.zarr")))
    np.testing.assert_array_equal(ds.read_chunk(2)[0], x[8:])
    assert len(pickle.dumps(ds)) < 1000          # the store name travels, not the pixels


def test_open_refuses_an_incomplete_store(tmp_path):
    create_store(tmp_path / "s.zarr", 10, (4, 4, 1), 5, {"source": "test"})
    with pytest.raises(ValueError, match="incomplete"):
        data.open_dataset(tmp_path / "s.zarr")


def test_open_refuses_missing_and_foreign_stores(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Zarr group"):
        data.open_dataset(tmp_path / "absent.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(ValueError, match="not a cnnx image store"):
        data.open_dataset(tmp_path / "other.zarr")


def test_read_and_read_chunk_check_their_bounds(tmp_path, rng):
    data.ingest_arrays(random_images(rng, 10), np.zeros(10, int), tmp_path / "s.zarr",
                       chunk_size=4)
    ds = data.open_dataset(tmp_path / "s.zarr")
    with pytest.raises(IndexError, match="3 chunks"):
        ds.read_chunk(3)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        ds.read([0, 10])


def test_ingest_arrays_rejects_bad_input(tmp_path, rng):
    with pytest.raises(ValueError, match="3 samples but y has 2"):
        data.ingest_arrays(random_images(rng, 3), [0, 1], tmp_path / "a.zarr")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.ingest_arrays(np.full((2, 3, 3), 2.0), [0, 1], tmp_path / "b.zarr")
    with pytest.raises(ValueError, match="class names"):
        data.ingest_arrays(random_images(rng, 2), [0, 2], tmp_path / "c.zarr",
                           class_names=["a", "b"])


def test_ingest_arrays_does_not_overwrite_unless_asked(tmp_path, rng):
    x = random_images(rng, 4)
    data.ingest_arrays(x, [0, 1, 0, 1], tmp_path / "s.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.ingest_arrays(x, [0, 1, 0, 1], tmp_path / "s.zarr")
    data.ingest_arrays(x[:2], [1, 1], tmp_path / "s.zarr", overwrite=True)
    assert len(data.open_dataset(tmp_path / "s.zarr")) == 2


def test_ingest_arrays_interrupted_then_rerun_finishes_the_store(tmp_path, rng):
    x = rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 40)
    store = str(tmp_path / "arrays.zarr")

    def stop_after_two_chunks(done, total):
        if done == 2:
            raise KeyboardInterrupt           # a real interruption, from inside the write loop

    with pytest.raises(KeyboardInterrupt):
        data.ingest_arrays(x, y, store, chunk_size=8, progress=stop_after_two_chunks)
    with pytest.raises(ValueError, match="incomplete"):
        data.open_dataset(store)
    data.ingest_arrays(x, y, store, chunk_size=8)          # the same call again, no overwrite=
    dataset = data.open_dataset(store)
    images, labels = dataset.read(np.arange(40))
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


# ------------------------------------------------------------------------ damaged stores

@pytest.fixture
def synthetic_store(tmp_path):
    """A complete make_synthetic store of 3 chunks of 8 images, on disk."""
    store = tmp_path / "faces.zarr"
    data.make_synthetic(store, 24, image_size=(10, 10), seed=3, chunk_size=8)
    return store


def test_a_deleted_image_chunk_is_an_error_naming_it_not_black_images(synthetic_store):
    (synthetic_store / "images" / "c" / "1" / "0" / "0" / "0").unlink()
    ds = data.open_dataset(synthetic_store)
    with pytest.raises(DamagedStoreError, match=r"chunk 1 is missing images/c/1/0/0/0"):
        ds.read_chunk(1)
    with pytest.raises(DamagedStoreError, match="images/c/1/0/0/0"):
        ds.read([0, 9])                       # image 9 lies in chunk 1
    ds.read_chunk(0), ds.read_chunk(2)        # the intact chunks still read


def test_a_deleted_label_chunk_is_an_error_naming_it_not_minus_one(synthetic_store):
    (synthetic_store / "labels" / "c" / "2").unlink()
    ds = data.open_dataset(synthetic_store)
    with pytest.raises(DamagedStoreError, match=r"chunk 2 is missing labels/c/2"):
        ds.read_chunk(2)
    with pytest.raises(DamagedStoreError, match="labels/c/2"):
        ds.split(0.5, 0.25, 0.25)             # all labels at once (split, counts)


@pytest.mark.parametrize("array, key", [("images", "c/1/0/0/0"), ("labels", "c/1")])
def test_a_truncated_chunk_is_named_as_corrupt(synthetic_store, array, key):
    path = synthetic_store / array / key
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    ds = data.open_dataset(synthetic_store)
    with pytest.raises(DamagedStoreError,
                       match=rf"chunk file {array}/{key} \(chunk 1\) is corrupt"):
        ds.read_chunk(1)
    if array == "labels":
        with pytest.raises(DamagedStoreError, match=f"{array}/{key}"):
            ds.labels


def test_labels_of_another_length_than_the_images_are_refused_at_open(synthetic_store):
    group = zarr.open_group(str(synthetic_store), mode="r+")
    labels = group["labels"][:]
    del group["labels"]
    group.create_array("labels", shape=(20,), chunks=(8,), dtype="int64", fill_value=-1)
    group["labels"][:] = labels[:20]
    with pytest.raises(ValueError, match=r"24 images in chunks of 8 but labels of shape \(20,\)"):
        data.open_dataset(synthetic_store)


def test_an_all_black_chunk_is_stored_and_reads_back(tmp_path, rng):
    # zarr skips chunks holding only the fill value (0) unless told; a store keeps them all,
    # so that a missing file always means damage
    x = random_images(rng, 12)
    x[4:8] = 0
    data.ingest_arrays(x, np.arange(12) % 2, tmp_path / "s.zarr", chunk_size=4)
    assert (tmp_path / "s.zarr" / "images" / "c" / "1" / "0" / "0" / "0").is_file()
    np.testing.assert_array_equal(data.open_dataset(tmp_path / "s.zarr").read_chunk(1)[0],
                                  x[4:8])
