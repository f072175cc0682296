"""Bundled datasets: scikit-image's faces and Fashion-MNIST from IDX files."""
import gzip
import os

import numpy as np
import pytest

from cnnx import data
from cnnx.data.datasets import FASHION_MNIST_DIR, write_idx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "experiments", "fashion_mnist_sample")


def test_load_faces():
    faces = data.load_faces()
    images, labels, class_names = faces
    assert images.shape == (200, 25, 25, 1) and images.dtype == np.uint8
    assert class_names == ("face", "non_face")
    assert np.bincount(labels).tolist() == [100, 100] and labels[0] == 0 and labels[-1] == 1
    assert images.max() > 200 and images.min() < 50   # the full uint8 range, not [0, 1]


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_reads_idx_files(tmp_path, rng, compress):
    suffix = ".gz" if compress else ""
    parts = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        parts[prefix] = images, labels
    train, test = data.load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(train.images[..., 0], parts["train"][0])
    np.testing.assert_array_equal(test.labels, parts["t10k"][1])
    assert train.labels.dtype == np.int64 and train.class_names[9] == "Ankle boot"
    both = data.load_fashion_mnist(tmp_path, subset="all")
    assert len(both.images) == 10 and both.class_names == train.class_names
    np.testing.assert_array_equal(both.labels[6:], parts["t10k"][1])
    np.testing.assert_array_equal(data.load_fashion_mnist(tmp_path, "test").images, test.images)
    with pytest.raises(ValueError, match="subset"):
        data.load_fashion_mnist(tmp_path, subset="val")


def test_read_idx_other_dtypes_and_truncation(tmp_path):
    values = np.arange(12, dtype=">i4").reshape(3, 4)
    write_idx(tmp_path / "x.idx", values)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.idx"), values)
    raw = (tmp_path / "x.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "cut.idx")
    (tmp_path / "junk.idx").write_bytes(b"\x89PNG0000")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "junk.idx")


@pytest.mark.parametrize("dtype", ["uint8", "int8", ">i2", "<i4", "float32", ">f8"])
def test_write_idx_round_trips_and_gzip_bytes_are_reproducible(tmp_path, dtype):
    values = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == "uint8":
        values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", values)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), values)
    write_idx(tmp_path / "b.gz", values)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    with gzip.open(tmp_path / "a.gz") as f:
        assert f.read(4)[2] == {"uint8": 8, "int8": 9, ">i2": 11, "<i4": 12, "float32": 13,
                                ">f8": 14}[dtype]
    with pytest.raises(TypeError, match="dtype int64"):
        write_idx(tmp_path / "c.gz", np.arange(3))


def test_the_shipped_sample_reads_as_fashion_mnist_with_its_licence():
    train, test = data.load_fashion_mnist(SAMPLE)
    assert train.images.shape == (6000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert np.bincount(train.labels).min() > 500 and np.bincount(test.labels).min() > 80
    assert sum(os.path.getsize(os.path.join(SAMPLE, f)) for f in os.listdir(SAMPLE)) < 4e6
    licence = open(os.path.join(SAMPLE, "LICENSE")).read()
    assert "Copyright © 2017 Zalando SE" in licence and "The MIT License" in licence


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist absent")
def test_the_shipped_sample_is_the_first_images_of_the_full_set():
    sample, full = data.load_fashion_mnist(SAMPLE), data.load_fashion_mnist()
    for part, whole in zip(sample, full):
        np.testing.assert_array_equal(part.images, whole.images[:len(part.images)])
        np.testing.assert_array_equal(part.labels, whole.labels[:len(part.labels)])


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_real_files():
    train, test = data.load_fashion_mnist()
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # a known property of the set: mean pixel ~72.9 (0.286 of 255)
    assert abs(train.images.mean() - 72.94) < 0.1


def test_faces_to_store_round_trip():
    faces = data.load_faces()
    summary = faces.to_store("memory://faces-round-trip", chunk_size=64)
    ds = data.open_dataset("memory://faces-round-trip")
    assert summary.n_chunks == ds.n_chunks == 4 and ds.class_names == faces.class_names
    images, labels = ds.read(np.arange(200))
    np.testing.assert_array_equal(images, faces.images)
    np.testing.assert_array_equal(labels, faces.labels)
