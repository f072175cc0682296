"""Ingest real image files written with scikit-image, including broken ones."""
import os
import struct
import zlib

import numpy as np
import pytest
import zarr
from skimage import io

from cnnx import data
from cnnx.data.ingest import load_image


def save(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io.imsave(path, pixels, check_contrast=False)


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels: a decompression bomb in 57 bytes."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body +
                struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


COLOURS = {"blue": (20, 40, 200), "red": (210, 30, 25)}


@pytest.fixture
def photo_folder(tmp_path):
    """Two classes of flat-coloured images in every format and mode, plus broken files."""
    source = tmp_path / "photos"
    for name, colour in COLOURS.items():
        rgb = np.empty((37, 45, 3), np.uint8)
        rgb[:] = colour
        save(f"{source}/{name}/a.png", rgb)
        save(f"{source}/{name}/b.jpg", rgb)
        save(f"{source}/{name}/c.bmp", rgb)
        save(f"{source}/{name}/d.tiff", np.dstack([rgb, np.full((37, 45), 255, np.uint8)]))
        save(f"{source}/{name}/e.png", rgb[:, :30])                     # another size
    save(f"{source}/blue/nested/f.png", np.dstack([np.full((8, 8, 3), (20, 40, 200), np.uint8),
                                                   np.full((8, 8), 255, np.uint8)]))
    save(f"{source}/red/grey16.png", np.full((30, 30), 65535, np.uint16))  # white, 16-bit
    save(f"{source}/red/clear.png", np.zeros((9, 9, 4), np.uint8))         # transparent: white
    good = open(f"{source}/red/a.png", "rb").read()
    (source / "red" / "truncated.png").write_bytes(good[:len(good) // 2])
    (source / "red" / "text.png").write_text("this is not an image")
    (source / "blue" / "zero.jpg").write_bytes(b"")
    (source / "blue" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (source / "blue" / "notes.txt").write_text("readme")
    (source / "stray.png").write_bytes(good)
    return source


EXPECTED_SKIPS = {
    "blue/bomb.png": "decompression bomb", "blue/zero.jpg": "empty file",
    "blue/notes.txt": "not an image file", "red/text.png": "not a readable image",
    "red/truncated.png": "truncated", "stray.png": "outside the class sub-folders"}


def test_ingest_round_trip_and_attributes(photo_folder, tmp_path):
    summary = data.ingest(photo_folder, tmp_path / "s.zarr", image_size=(16, 12), chunk_size=3)
    ds = data.open_dataset(tmp_path / "s.zarr")
    assert ds.class_names == ("blue", "red") and ds.counts == (6, 7)
    assert (len(ds), ds.image_shape, ds.chunk_size) == (13, (16, 12, 3), 3)
    images, labels = ds.read(np.arange(len(ds)))
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    # each image is flat: its colour survives decoding, mode conversion and resizing
    colours = images.reshape(13, -1, 3).mean(axis=1)
    assert np.ptp(images.reshape(13, -1, 3), axis=1).max() <= 3
    for label, name in enumerate(ds.class_names):
        mine = colours[labels == label]
        close = np.abs(mine - COLOURS[name]).max(axis=1) <= 3
        if name == "blue":
            assert close.all()
        else:   # the 16-bit grey and the transparent image become white
            assert close.sum() == 5 and (np.abs(mine[~close] - 255) <= 1).all()
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, pixels.std(axis=0), rtol=1e-5)
    assert ds.attrs["source"] == os.path.abspath(photo_folder)
    assert ds.attrs["image_size"] == [16, 12]
    skipped = {item["path"]: item["reason"] for item in ds.skipped}
    assert set(skipped) == set(EXPECTED_SKIPS)
    for path, reason in EXPECTED_SKIPS.items():
        assert reason in skipped[path], (path, skipped[path])
    assert summary.skipped == ds.skipped and summary.n_images == 13
    assert "blue/bomb.png" in str(summary)
    assert "_staging" not in zarr.open_group(str(tmp_path / "s.zarr"), mode="r")


def test_chunks_mix_the_classes(tmp_path):
    source = tmp_path / "src"
    for name in ("a", "b"):
        for i in range(20):
            save(f"{source}/{name}/{i}.png", np.full((4, 4), 100 if name == "a" else 200,
                                                      np.uint8))
    data.ingest(source, tmp_path / "s.zarr", image_size=(4, 4), grayscale=True, chunk_size=10)
    ds = data.open_dataset(tmp_path / "s.zarr")
    assert ds.image_shape == (4, 4, 1)
    for i in range(ds.n_chunks):
        images, labels = ds.read_chunk(i)
        assert 0 < labels.mean() < 1                          # both classes in every chunk
        np.testing.assert_array_equal(images[:, 0, 0, 0], np.where(labels == 0, 100, 200))


def test_grayscale_and_memory_store(photo_folder):
    summary = data.ingest(photo_folder, "memory://ingest-grey", image_size=(5, 5),
                          grayscale=True)
    ds = data.open_dataset("memory://ingest-grey")
    assert ds.image_shape == (5, 5, 1) and len(ds) == summary.n_images == 13


def test_interrupted_ingest_resumes_without_duplicates(photo_folder, tmp_path):
    store = tmp_path / "s.zarr"

    class Interrupt(Exception):
        pass

    def stop_after_two(done, total):
        if done == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        data.ingest(photo_folder, store, image_size=(8, 8), chunk_size=3,
                    progress=stop_after_two)
    with pytest.raises(ValueError, match="incomplete"):
        data.open_dataset(store)
    # a different setting must not silently mix with the half-built store
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.ingest(photo_folder, store, image_size=(9, 9), chunk_size=3)
    seen = []
    summary = data.ingest(photo_folder, store, image_size=(8, 8), chunk_size=3,
                          progress=lambda done, total: seen.append(done))
    assert summary.resumed_chunks == 2 and seen == [2, 3, 4, 5, 6]   # 17 candidates, 6 chunks
    data.ingest(photo_folder, tmp_path / "fresh.zarr", image_size=(8, 8), chunk_size=3)
    resumed, fresh = data.open_dataset(store), data.open_dataset(tmp_path / "fresh.zarr")
    assert len(resumed) == len(fresh) == 13
    for a, b in zip(resumed.read(np.arange(13)), fresh.read(np.arange(13))):
        np.testing.assert_array_equal(a, b)
    assert resumed.skipped == fresh.skipped
    # running again on the complete store changes nothing
    again = data.ingest(photo_folder, store, image_size=(8, 8), chunk_size=3)
    assert again.n_images == 13


def test_parallel_ingest_interrupted_then_resumed_equals_serial(tmp_path):
    source = tmp_path / "src"
    rng = np.random.default_rng(5)
    for name in ("x", "y"):
        for i in range(9):
            save(f"{source}/{name}/{i}.png", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    (source / "y" / "9.png").write_bytes(b"junk")

    def stop_at_first(done, total):
        if done == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.ingest(source, tmp_path / "p.zarr", image_size=(10, 10), chunk_size=4,
                    workers=2, progress=stop_at_first)
    summary = data.ingest(source, tmp_path / "p.zarr", image_size=(10, 10), chunk_size=4,
                          workers=2)
    assert summary.resumed_chunks >= 1
    data.ingest(source, tmp_path / "s.zarr", image_size=(10, 10), chunk_size=4, workers=1)
    parallel = data.open_dataset(tmp_path / "p.zarr")
    serial = data.open_dataset(tmp_path / "s.zarr")
    assert len(parallel) == 18 and parallel.skipped == serial.skipped
    for a, b in zip(parallel.read(np.arange(18)), serial.read(np.arange(18))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(parallel.mean, serial.mean)


def test_empty_class_folder_and_empty_source_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.ingest(tmp_path / "empty", tmp_path / "a.zarr")
    save(f"{tmp_path}/src/cats/a.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "src" / "dogs").mkdir()
    with pytest.raises(ValueError, match="dogs.*holds no image files"):
        data.ingest(tmp_path / "src", tmp_path / "b.zarr")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ingest(tmp_path / "absent", tmp_path / "c.zarr")


def test_all_files_broken_is_an_error(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of the 1 image files"):
        data.ingest(tmp_path / "src", tmp_path / "s.zarr")


def test_load_image_limits_pixels_and_resizes_with_antialiasing(tmp_path):
    stripes = np.zeros((64, 64), np.uint8)
    stripes[:, ::2] = 255                                   # finest possible detail
    save(f"{tmp_path}/s.png", stripes)
    small = load_image(f"{tmp_path}/s.png", (8, 8), grayscale=True)
    assert small.shape == (8, 8, 1) and np.abs(small.astype(int) - 128).max() <= 2
    with pytest.raises(data.BadImage, match="max_pixels=1000"):
        load_image(f"{tmp_path}/s.png", (8, 8), max_pixels=1000)


KILLED_RUN = """
import os, signal, sys
from cnnx import data

def die_after_three(done, total):
    if done == 3:                      # a hard crash: no finally, no flush, no clean-up
        os.kill(os.getpid(), signal.SIGKILL)

data.ingest(sys.argv[1], sys.argv[2], image_size=(8, 8), chunk_size=2, workers=1,
            progress=die_after_three)
"""


def test_ingest_killed_with_sigkill_finishes_on_rerun(photo_folder, tmp_path):
    import subprocess
    import sys
    store = tmp_path / "s.zarr"
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, str(photo_folder), str(store)],
                         capture_output=True, timeout=120)
    assert run.returncode == -9, run.stderr.decode()
    with pytest.raises(ValueError, match="incomplete"):
        data.open_dataset(store)
    data.ingest(photo_folder, store, image_size=(8, 8), chunk_size=2)
    data.ingest(photo_folder, tmp_path / "fresh.zarr", image_size=(8, 8), chunk_size=2)
    resumed, fresh = data.open_dataset(store), data.open_dataset(tmp_path / "fresh.zarr")
    assert len(resumed) == len(fresh) == 13 and resumed.counts == fresh.counts
    for a, b in zip(resumed.read(np.arange(13)), fresh.read(np.arange(13))):
        np.testing.assert_array_equal(a, b)


def test_load_image_palette_grey_alpha_and_cmyk(tmp_path):
    from PIL import Image
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:] = (200, 30, 40)
    picture = Image.fromarray(rgb)
    picture.convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    picture.convert("LA").save(tmp_path / "grey_alpha.png")
    picture.convert("CMYK").save(tmp_path / "cmyk.jpg")
    grey = np.asarray(picture.convert("L"))[0, 0]
    cmyk_as_rgb = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))[0, 0]
    expected = {"palette.png": (200, 30, 40), "grey_alpha.png": (grey,) * 3,
                "cmyk.jpg": tuple(cmyk_as_rgb)}
    for name, colour in expected.items():
        image = load_image(tmp_path / name, (4, 4))
        assert image.shape == (4, 4, 3)
        np.testing.assert_allclose(image[0, 0], colour, atol=2, err_msg=name)


def test_a_chunk_of_black_photos_is_stored_and_reads_back(tmp_path):
    # zarr skips chunks equal to the fill value; a reader takes a missing chunk for damage
    for label in ("dark", "night"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(4):
            save(tmp_path / "photos" / label / f"{i}.png", np.zeros((12, 12), np.uint8))
    data.ingest(tmp_path / "photos", tmp_path / "black.zarr", image_size=(8, 8),
                grayscale=True, chunk_size=4, workers=1)
    images, labels = data.open_dataset(tmp_path / "black.zarr").read_chunk(1)
    assert images.shape == (4, 8, 8, 1) and not images.any()
    assert sorted(labels.tolist() + data.open_dataset(tmp_path / "black.zarr")
                  .read_chunk(0)[1].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
