"""Procedurally drawn faces with and without glasses, for stores of any size.

A stand-in for the papers' GAN-generated glasses set: each image is a face (skin tone, head
size and position, hair, eyes, mouth, background, lighting and noise all vary) and class 1
adds glasses (frame colour, size and thickness vary; some lenses are tinted). Chunk i is
drawn from np.random.default_rng((seed, i)) alone, so any worker can draw any chunk and the
store depends only on (n, image_size, seed, chunk_size), not on the number of workers.
"""
import time

import numpy as np
import zarr

from cnnx.data.chunks import ChunkRunner, default_workers
from cnnx.data.datasets import _progress_bar
from cnnx.data.store import (DEFAULT_CHUNK_SIZE, FORMAT, add_pixel_sums, finalize,
                             is_shared_store, pixel_sums, resumable_group, store_url,
                             write_chunk)
from cnnx.data.summary import StoreSummary

CLASS_NAMES = ("no_glasses", "glasses")
BLOCK_PIXELS = 32 * 80 * 80   # pixels drawn per block (see draw_faces)
SERIAL_BELOW = 8192            # spawning workers costs ~1-2 s: small stores draw in-process


def draw_faces(rng, n, image_size=(80, 80)):
    """Images uint8 (n, H, W, 3) and labels int64 (n,) (1 = glasses), drawn from `rng`."""
    # a few faces at a time: the temporaries then stay in cache (~1.4x faster than 256)
    step = max(1, BLOCK_PIXELS // (image_size[0] * image_size[1]))
    images = np.empty((n, *image_size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for start in range(0, n, step):
        stop = min(start + step, n)
        images[start:stop], labels[start:stop] = _draw_block(rng, stop - start, image_size)
    return images, labels


def _draw_block(rng, n, image_size):
    height, width = image_size
    labels = (rng.random(n) < 0.5).astype(np.int64)
    yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]    # (1, H, 1)
    xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, None, :]      # (1, 1, W)
    soft = np.float32(1.0 / min(height, width))            # one pixel of edge blur

    def column(values):                                    # (n,) -> (n, 1, 1)
        return np.asarray(values, np.float32)[:, None, None]

    def uniform(low, high, size=None):
        return column(rng.uniform(low, high, n if size is None else size))

    def ellipse(cy, cx, ry, rx):
        """Soft mask (n, H, W): 1 inside, 0 outside, linear over about one pixel."""
        distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        return np.clip((1 - distance) * np.minimum(ry, rx) / soft + 0.5, 0, 1)

    def paint(image, mask, colour):                        # colour (n, 3)
        # planar (3, n, H, W): blending plane by plane is ~10x faster than broadcasting
        # over a last axis of 3
        colour = np.asarray(colour, np.float32)
        for channel in range(3):
            plane = image[channel]
            plane += mask * (colour[:, channel, None, None] - plane)

    # background: a random colour with a vertical light gradient
    top, bottom = rng.uniform(0, 255, (3, n, 1, 1)), rng.uniform(0, 255, (3, n, 1, 1))
    image = np.empty((3, n, height, width), np.float32)
    image[:] = top * (1 - yy) + bottom * yy

    cy, cx = uniform(0.47, 0.58), uniform(0.40, 0.60)
    rx = uniform(0.24, 0.32)
    ry = rx * uniform(1.15, 1.35)
    tone = rng.random(n)[:, None]
    skin = (1 - tone) * [236, 200, 170] + tone * [105, 70, 50]
    hair = rng.uniform(10, 140, (n, 1)) * rng.uniform(0.5, 1.0, (n, 3))
    # hair: a larger ellipse behind the face, kept only above the forehead
    hair_mask = ellipse(cy - 0.08 * ry, cx, ry * uniform(1.0, 1.15), rx * uniform(1.05, 1.2))
    hair_mask *= yy < cy - column(rng.uniform(0.1, 0.6, n)) * ry
    paint(image, hair_mask, hair)
    paint(image, ellipse(cy, cx, ry, rx), skin)

    eye_y = cy - uniform(0.12, 0.22) * ry
    eye_dx = uniform(0.33, 0.43) * rx
    eye_r = uniform(0.07, 0.11) * rx
    eye_colour = rng.uniform(10, 90, (n, 3))
    for side in (-1, 1):
        paint(image, ellipse(eye_y, cx + side * eye_dx, eye_r, eye_r * 1.3), eye_colour)
    mouth = ellipse(cy + uniform(0.45, 0.6) * ry, cx, uniform(0.04, 0.08) * ry,
                    uniform(0.2, 0.35) * rx)
    paint(image, mouth, np.array([150, 40, 50]) * rng.uniform(0.6, 1.1, (n, 1)))

    # glasses: two rings around the eyes and a bridge, on class 1 only
    wearing = column(labels)
    lens_r = eye_r * uniform(2.0, 2.8)
    thickness = uniform(0.12, 0.3)                         # fraction of the lens radius
    colourful = rng.random(n)[:, None] < 0.3               # most frames dark, some coloured
    frame = np.where(colourful, rng.uniform(0, 255, (n, 3)), rng.uniform(0, 80, (n, 3)))
    tinted = column(rng.random(n) < 0.3) * uniform(0.3, 0.7)
    for side in (-1, 1):
        lens_x = cx + side * eye_dx
        outer = ellipse(eye_y, lens_x, lens_r, lens_r * 1.2)
        inner = ellipse(eye_y, lens_x, lens_r * (1 - thickness), lens_r * 1.2 * (1 - thickness))
        paint(image, inner * tinted * wearing, np.full((n, 3), 20.0))
        paint(image, (outer - inner) * wearing, frame)
    bridge = ((np.abs(yy - eye_y) < thickness * lens_r * 0.6) &
              (np.abs(xx - cx) < eye_dx - lens_r * 1.1)).astype(np.float32)
    paint(image, bridge * wearing, frame)

    # lighting and sensor noise
    image *= uniform(0.7, 1.2)
    image += rng.standard_normal(image.shape, np.float32) * np.float32(6)
    np.clip(image, 0, 255, out=image)
    return np.ascontiguousarray(image.transpose(1, 2, 3, 0)).astype(np.uint8), labels


def _draw_chunk(store, index, seed, image_size):
    """Worker task: draw chunk `index` and write it; it alone owns this chunk."""
    group = zarr.open_group(store_url(store), mode="r+")
    chunk_size, n = group["images"].chunks[0], group["images"].shape[0]
    n_images = min(chunk_size, n - index * chunk_size)
    images, labels = draw_faces(np.random.default_rng((seed, index)), n_images, image_size)
    write_chunk(group, index, images, labels)
    return {"sums": pixel_sums(images), "counts": np.bincount(labels, minlength=2).tolist()}


def make_synthetic(store, n, image_size=(80, 80), seed=0, chunk_size=DEFAULT_CHUNK_SIZE,
                   workers=None, overwrite=False, progress=False, verbose=False):
    """Draw `n` synthetic faces (class 1 wears glasses) into a store; returns a StoreSummary.

    Chunks are drawn in parallel by `workers` processes (default: all cores for large n).
    An interrupted run resumes when re-run with the same arguments.
    """
    started = time.perf_counter()
    # checked before anything is written: a bad argument must leave no folder behind
    n = _positive_int("n", n)
    chunk_size = _positive_int("chunk_size", chunk_size)
    if not isinstance(image_size, (tuple, list, np.ndarray)) or len(image_size) != 2:
        raise ValueError(f"make_synthetic: image_size must be (height, width), "
                         f"got {image_size!r}")
    image_size = tuple(_positive_int("image_size", s) for s in image_size)
    url = store_url(store)
    plan = {"generator": "synthetic-faces-1", "n": int(n), "image_size": list(image_size),
            "seed": int(seed), "chunk_size": int(chunk_size)}
    group = _open_or_create(url, plan, n, image_size, chunk_size, overwrite)
    n_chunks = -(-n // chunk_size)
    if group.attrs.get("complete"):
        return StoreSummary.from_group(url, group, time.perf_counter() - started, n_chunks)
    done = dict(group.attrs.get("done", {}))
    resumed = len(done)
    if workers is None:
        workers = 1 if n < SERIAL_BELOW else default_workers(n_chunks)
    if not is_shared_store(url):
        workers = 1
    jobs = [(i, (url, i, seed, image_size)) for i in range(n_chunks) if str(i) not in done]
    bar = _progress_bar(progress, n_chunks, "synth")
    bar(len(done))
    last_saved = time.monotonic()
    try:
        with ChunkRunner(workers) as runner:
            for index, record in runner.run(_draw_chunk, jobs):
                done[str(index)] = record
                bar(1)
                # the parent alone writes bookkeeping, at most once a second (not per chunk:
                # a million images make thousands of chunks)
                if time.monotonic() - last_saved > 1:
                    group.attrs["done"] = done
                    last_saved = time.monotonic()
    finally:
        group.attrs["done"] = done
    sums, counts = None, np.zeros(2, np.int64)
    for record in done.values():
        sums = add_pixel_sums(sums, record["sums"])
        counts += record["counts"]
    del group.attrs["done"]        # (lost before finalize, a re-run just redraws: same pixels)
    finalize(group, sums, counts, CLASS_NAMES,
             {"source": f"cnnx.data.make_synthetic(seed={seed})", "skipped": []})
    summary = StoreSummary.from_group(url, group, time.perf_counter() - started, resumed)
    if verbose:
        print(summary)
    return summary


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"make_synthetic: {name} must be a positive integer, "
                        f"got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"make_synthetic: {name} must be a positive integer, got {value}")
    return int(value)


def _open_or_create(url, plan, n, image_size, chunk_size, overwrite):
    """The store's group: existing from the same plan (resume), or new with its arrays."""
    group = resumable_group(url, plan, overwrite, "make_synthetic")
    if group is not None:
        return group
    group = zarr.open_group(url, mode="w")
    height, width = image_size
    group.create_array("images", shape=(n, height, width, 3), chunks=(chunk_size, height,
                       width, 3), dtype="uint8", fill_value=0)
    group.create_array("labels", shape=(n,), chunks=(chunk_size,), dtype="int64", fill_value=-1)
    group.attrs.update({"format": FORMAT, "complete": False, "plan": plan, "n_images": int(n),
                        "chunk_size": int(chunk_size), "image_size": list(image_size),
                        "channels": 3})
    return group
