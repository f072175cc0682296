"""Ingest sources by URL: a local folder, `file://` and an fsspec `memory://` folder give the
same store from the same files."""
import os

import fsspec
import numpy as np
import pytest
import zarr
from PIL import Image

from cnnx import data

SETTINGS = {"image_size": (9, 7), "chunk_size": 4}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources") / "photos"
    rng = np.random.default_rng(3)
    for name in ("owls", "larks"):
        os.makedirs(root / name / "more")
        for i in range(5):
            pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / ("more" if i == 4 else "") / f"{i}.jpg")
    (root / "owls" / "bad.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def local_store(photos, tmp_path_factory):
    store = tmp_path_factory.mktemp("local") / "local.zarr"
    data.ingest(photos, store, **SETTINGS)
    return store


def read_all(store):
    group = zarr.open_group(str(store), mode="r")
    return group["images"][...], group["labels"][...], group.attrs.asdict()


def assert_same_content(a, b):
    (images_a, labels_a, attrs_a), (images_b, labels_b, attrs_b) = read_all(a), read_all(b)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    for key in ("class_names", "counts", "mean", "std", "skipped", "n_images"):
        assert attrs_a[key] == attrs_b[key], key


def test_file_url_source_equals_the_plain_path(photos, local_store, tmp_path):
    url = photos.as_uri()                                   # file:///...
    data.ingest(url, tmp_path / "s.zarr", **SETTINGS)
    assert_same_content(tmp_path / "s.zarr", local_store)
    assert data.open_dataset(tmp_path / "s.zarr").attrs["source"] == url
    assert data.open_dataset(local_store).attrs["source"] == str(photos)


def test_memory_source_equals_the_local_folder(photos, local_store, tmp_path):
    memory = fsspec.filesystem("memory")
    for root, _, files in os.walk(photos):
        for file in files:
            relative = os.path.relpath(os.path.join(root, file), photos)
            memory.pipe(f"/src-test/{relative}", open(os.path.join(root, file), "rb").read())
    # workers=2 is refused quietly: other processes cannot see this process's memory://
    summary = data.ingest("memory://src-test", tmp_path / "m.zarr", workers=2, **SETTINGS)
    assert summary.n_images == 10
    assert [s["path"] for s in summary.skipped] == ["owls/bad.png"]
    assert_same_content(tmp_path / "m.zarr", local_store)


def test_missing_url_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'memory://nowhere' does not exist"):
        data.ingest("memory://nowhere", tmp_path / "s.zarr")
