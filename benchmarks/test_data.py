"""Data benchmarks: ingest (1024x1024 PNG -> 80x80), reading a training batch (read +
decode + normalise + augment), and synthetic generation. Run serially:

    pytest benchmarks/test_data.py --benchmark-only -p no:xdist

Figures land in extra_info: images/s per process, and for the batch path the share of a
150 ms training step it costs (the target is well under 10%).
"""
import os

import numpy as np
import pytest
from skimage import io

from cnnx import data
from cnnx.data.ingest import load_image

BATCH = 64
STEP_SECONDS = 0.150        # a training step of the papers' model on this class of CPU
N_PHOTOS = 8


def photo(rng, size=1024):
    """A photo-like RGB image: smooth shapes plus sensor noise (PNG compresses it ~2:1)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([np.sin(xx * rng.uniform(3, 9)) * 80 + 120,
                      np.cos(yy * rng.uniform(3, 9)) * 80 + 120,
                      (xx + yy) * 60 + 40], axis=-1)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(N_PHOTOS):
        folder = root / ("glasses" if i % 2 else "no_glasses")
        folder.mkdir(exist_ok=True)
        io.imsave(folder / f"{i}.png", photo(rng), check_contrast=False)
    return root


def per_second(benchmark, n_items):
    return n_items / benchmark.stats.stats.median


@pytest.mark.benchmark(group="ingest")
def test_decode_and_resize_one_png(benchmark, photo_folder):
    path = str(photo_folder / "no_glasses" / "0.png")
    image = benchmark(load_image, path, (80, 80))
    assert image.shape == (80, 80, 3) and image.dtype == np.uint8
    benchmark.extra_info["images_per_s_per_process"] = per_second(benchmark, 1)


@pytest.mark.benchmark(group="ingest")
def test_ingest_folder_one_process(benchmark, photo_folder, tmp_path):
    stores = iter(range(1000))

    def run():
        return data.ingest(photo_folder, tmp_path / f"s{next(stores)}.zarr",
                           image_size=(80, 80), chunk_size=4, workers=1)
    summary = benchmark.pedantic(run, rounds=3, iterations=1)
    assert summary.n_images == N_PHOTOS and not summary.skipped
    benchmark.extra_info["images_per_s_per_process"] = per_second(benchmark, N_PHOTOS)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "synth.zarr"
    data.make_synthetic(path, 16 * BATCH, image_size=(80, 80), chunk_size=BATCH, workers=1)
    return data.open_dataset(path)


def record_batch(benchmark):
    info = benchmark.extra_info
    info["images_per_s"] = per_second(benchmark, BATCH)
    info["share_of_150ms_step"] = benchmark.stats.stats.median / STEP_SECONDS


@pytest.mark.benchmark(group="batch")
def test_read_chunk(benchmark, store):
    chunks = iter(np.arange(10 ** 6) % store.n_chunks)
    images, labels = benchmark(lambda: store.read_chunk(next(chunks)))
    assert images.shape == (BATCH, 80, 80, 3)
    record_batch(benchmark)


@pytest.mark.benchmark(group="batch")
def test_read_and_normalize(benchmark, store):
    chunks = iter(np.arange(10 ** 6) % store.n_chunks)

    def batch():
        images, labels = store.read_chunk(next(chunks))
        return store.normalize(images, "standardize"), labels
    x, _ = benchmark(batch)
    assert x.dtype == np.float32 and abs(float(x.mean())) < 0.5
    record_batch(benchmark)


@pytest.mark.benchmark(group="batch")
def test_read_normalize_flip_contrast(benchmark, store):
    augment = data.Augment(horizontal_flip=0.5, contrast=0.2)
    keys = iter(range(10 ** 6))

    def batch():
        key = next(keys)
        images, labels = store.read_chunk(key % store.n_chunks)
        return augment(store.normalize(images), (0, key)), labels
    benchmark(batch)
    record_batch(benchmark)


@pytest.mark.benchmark(group="batch")
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_read_normalize_augment_all(benchmark, store, interpolation):
    augment = data.Augment(horizontal_flip=0.5, vertical_flip=0.5, rotation=15, zoom=0.1,
                           translation=0.1, contrast=0.2, invert=0.1,
                           interpolation=interpolation)
    keys = iter(range(10 ** 6))

    def batch():
        key = next(keys)
        images, labels = store.read_chunk(key % store.n_chunks)
        return augment(store.normalize(images), (0, key)), labels
    x, _ = benchmark(batch)
    assert x.shape == (BATCH, 80, 80, 3) and np.isfinite(x).all()
    record_batch(benchmark)


@pytest.mark.benchmark(group="synthetic")
def test_draw_faces(benchmark):
    keys = iter(range(10 ** 6))
    images, _ = benchmark(lambda: data.draw_faces(np.random.default_rng(next(keys)), 256))
    assert images.shape == (256, 80, 80, 3)
    benchmark.extra_info["images_per_s_per_process"] = per_second(benchmark, 256)


@pytest.mark.benchmark(group="synthetic")
def test_make_synthetic_store(benchmark, tmp_path):
    n = 2048
    stores = iter(range(1000))

    def run():
        return data.make_synthetic(tmp_path / f"s{next(stores)}.zarr", n, workers=1)
    summary = benchmark.pedantic(run, rounds=3, iterations=1)
    assert summary.n_images == n
    benchmark.extra_info["images_per_s_per_process"] = per_second(benchmark, n)
    benchmark.extra_info["bytes_on_disk_per_image"] = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(summary.store)
        for f in fs) / n
