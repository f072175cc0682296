"""Ingest a folder of images (one sub-folder per class) into a cnnx store, in parallel,
resumably, skipping and reporting every file that is not a usable image.

Two phases, both resumable:
  1. decode: candidate files (shuffled once, deterministically, so every chunk mixes the
     classes) are cut into chunks; a worker decodes chunk i and writes it to the staging
     array `_staging/images` (one slot per candidate), returning which files failed and
     the pixel sums of the good ones. The parent records each finished chunk in the
     staging attributes, so a re-run decodes only the chunks not recorded.
  2. compact: the good images are copied, chunk by chunk, into the final `images` and
     `labels`; then the statistics are written and the store is marked complete.
"""
import hashlib
import json
import os
import time
import warnings

import numpy as np
import zarr

from cnnx.data.chunks import ChunkRunner, default_workers
from cnnx.data.datasets import _progress_bar
from cnnx.data.store import (DEFAULT_CHUNK_SIZE, FORMAT, add_pixel_sums, chunk_bounds,
                             finalize, is_shared_store, pixel_sums, resumable_group,
                             store_url)
from cnnx.data.summary import StoreSummary

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 2 ** 26   # 8192 x 8192; larger files are refused as decompression bombs
SERIAL_BELOW = 512             # spawning workers costs ~1-2 s: small folders ingest in-process


class BadImage(Exception):
    """A file that cannot become a training image; the message is the reason."""


def load_image(path, image_size, grayscale=False, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode one file with scikit-image into uint8 (H, W, C), C = 1 if grayscale else 3.

    Raises BadImage with the reason for an empty, corrupt, truncated, oversized or
    non-image file.
    """
    from PIL import Image
    from skimage import io

    if os.path.getsize(path) == 0:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:   # the header alone tells the size: refuse bombs before decoding them
            with Image.open(path) as header:
                width, height = header.size
                mode = header.mode
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"decompression bomb: {error}") from None
        except Exception as error:         # Pillow raises OSError, SyntaxError, ValueError...
            raise BadImage(f"not a readable image: {error}") from None
        if width * height > max_pixels:
            raise BadImage(f"decompression bomb: {width}x{height} = {width * height} pixels "
                           f"exceeds max_pixels={max_pixels}")
        try:
            pixels = io.imread(path)
        except Exception as error:
            raise BadImage(f"corrupt or truncated image: {type(error).__name__}: {error}") \
                from None
    if mode == "CMYK" and pixels.ndim == 3 and pixels.shape[-1] == 4:
        # four channels that are not RGBA: ink to light as Pillow does, R = (1-C)(1-K)
        ink = pixels.astype(np.float32) / 255
        pixels = np.round((1 - ink[..., :3]) * (1 - ink[..., 3:]) * 255).astype(np.uint8)
    return to_model_image(pixels, image_size, grayscale)


def to_model_image(pixels, image_size, grayscale=False):
    """Any decoded image (grey, grey+alpha, RGB, RGBA; any integer or float dtype) ->
    uint8 (H, W, C), resized with anti-aliasing."""
    from skimage.color import gray2rgb, rgb2gray, rgba2rgb
    from skimage.transform import resize
    from skimage.util import img_as_float32

    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4) or min(pixels.shape[:2]) < 1:
        raise BadImage(f"unsupported image shape {pixels.shape} (multi-frame or volume?)")
    image = img_as_float32(pixels)
    if image.shape[-1] == 2:                   # grey + alpha: blend over white like rgba2rgb
        alpha = image[..., 1:]
        image = image[..., :1] * alpha + (1 - alpha)
    elif image.shape[-1] == 4:
        image = rgba2rgb(image).astype(np.float32)
    if grayscale and image.shape[-1] == 3:
        image = rgb2gray(image)[..., np.newaxis].astype(np.float32)
    elif not grayscale and image.shape[-1] == 1:
        image = gray2rgb(image[..., 0])
    image = _block_reduce(image, image_size)
    out = resize(image, image_size, anti_aliasing=True)          # float64 in [0, 1]
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def _block_reduce(image, image_size):
    """Average k x k blocks first when shrinking by more than 4x: anti-aliased resize of a
    1024x1024 photo takes ~0.4 s, the block mean then the resize ~0.03 s, nearly the same."""
    height, width = image.shape[:2]
    k = int(min(height / image_size[0], width / image_size[1]) // 2)
    if k < 2:
        return image
    h, w, channels = height // k * k, width // k * k, image.shape[-1]
    # rows of k first (contiguous W*C sums), then columns of k: ~5x faster than one
    # mean over two strided axes of a 5-D view
    rows = image[:h, :w].reshape(h // k, k, w * channels).sum(axis=1)           # (h/k, w*C)
    return rows.reshape(h // k, w // k, k, channels).sum(axis=2) / np.float32(k * k)


def scan_folder(source):
    """Sorted class names, candidate (relative path, label) pairs, and files skipped at once."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"ingest: source folder {source!r} does not exist")
    entries = sorted(os.listdir(source))
    class_names = [e for e in entries if os.path.isdir(os.path.join(source, e))
                   and not e.startswith(".")]
    skipped = [{"path": e, "reason": "file outside the class sub-folders"}
               for e in entries if os.path.isfile(os.path.join(source, e))]
    if not class_names:
        raise ValueError(f"ingest: {source!r} has no class sub-folders; expected one "
                         "sub-folder of images per class (e.g. photos/glasses/*.jpg)")
    candidates = []
    for label, name in enumerate(class_names):
        found = 0
        for root, dirs, files in os.walk(os.path.join(source, name)):
            dirs.sort()
            for file in sorted(files):
                relative = os.path.relpath(os.path.join(root, file), source)
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    candidates.append((relative, label))
                    found += 1
                else:
                    skipped.append({"path": relative, "reason": "not an image file "
                                    f"(extensions read: {', '.join(IMAGE_EXTENSIONS)})"})
        if found == 0:
            raise ValueError(f"ingest: class folder {os.path.join(source, name)!r} holds no "
                             f"image files ({', '.join(IMAGE_EXTENSIONS)}); remove it or add "
                             "images")
    return class_names, candidates, skipped


def _plan_key(source, candidates, image_size, grayscale, chunk_size, max_pixels, seed):
    """Fingerprint of everything that decides the store's content, to resume safely."""
    digest = hashlib.sha256()
    for relative, label in candidates:
        stat = os.stat(os.path.join(source, relative))
        digest.update(f"{relative}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    settings = [list(image_size), grayscale, chunk_size, max_pixels, seed]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def _decode_chunk(store, index, source, files, image_size, grayscale, max_pixels):
    """Phase 1 task: decode chunk `index` of the candidates into `_staging/images`."""
    channels = 1 if grayscale else 3
    images = np.zeros((len(files), *image_size, channels), np.uint8)
    failed, skipped = [], []
    for offset, relative in enumerate(files):
        try:
            images[offset] = load_image(os.path.join(source, relative), image_size,
                                        grayscale, max_pixels)
        except BadImage as error:
            failed.append(offset)
            skipped.append({"path": relative, "reason": str(error)})
    staging = zarr.open_array(store_url(store), path="_staging/images", mode="r+")
    start = index * staging.chunks[0]
    staging[start:start + len(files)] = images
    good = np.delete(images, failed, axis=0)
    return {"failed": failed, "skipped": skipped,
            "sums": pixel_sums(good) if len(good) else None}


def _compact_chunk(store, index, positions, labels):
    """Phase 2 task: copy the good images at staging `positions` into final chunk `index`."""
    group = zarr.open_group(store_url(store), mode="r+")
    low, high = int(positions[0]), int(positions[-1]) + 1
    images = group["_staging/images"][low:high][positions - low]
    start, stop = chunk_bounds(index, group["images"].chunks[0], group["images"].shape[0])
    group["images"][start:stop] = images
    group["labels"][start:stop] = labels
    return stop - start


def ingest(source, store, image_size=(80, 80), grayscale=False, chunk_size=DEFAULT_CHUNK_SIZE,
           workers=None, overwrite=False, max_pixels=DEFAULT_MAX_PIXELS, seed=0,
           progress=False, verbose=False):
    """Ingest `source/<class>/<images>` into the store; returns a StoreSummary.

    Classes are the sorted sub-folder names. Images are decoded with scikit-image,
    converted to RGB (or grey with grayscale=True), resized with anti-aliasing to
    `image_size` and stored as uint8 in a random (seeded) order so every chunk mixes the
    classes. Unusable files are skipped and listed with their reason in the summary and the
    store's `skipped` attribute. `workers` processes decode in parallel (default: all cores
    for large folders). Re-running after an interruption resumes; re-running on a complete
    store built from the same files and settings returns its summary.
    `progress`: True for a tqdm bar, or a callable(done_chunks, total_chunks).
    """
    started = time.perf_counter()
    source = os.fspath(source)
    image_size = tuple(int(s) for s in image_size)
    url = store_url(store)
    class_names, candidates, skipped_at_scan = scan_folder(source)
    order = np.random.default_rng(seed).permutation(len(candidates))
    candidates = [candidates[i] for i in order]
    plan = _plan_key(source, candidates, image_size, grayscale, chunk_size, max_pixels, seed)
    group = _open_or_create(url, plan, overwrite)
    attrs = group.attrs.asdict()
    if attrs.get("complete"):
        _drop_staging(group)
        return StoreSummary.from_group(url, group, time.perf_counter() - started,
                                       resumed_chunks=-(-group["images"].shape[0] // chunk_size))
    channels = 1 if grayscale else 3
    if "_staging" not in group:
        staging = group.create_group("_staging", attributes={"done": {}})
        staging.create_array("images", shape=(len(candidates), *image_size, channels),
                             chunks=(chunk_size, *image_size, channels), dtype="uint8",
                             fill_value=0)
    staging = group["_staging"]
    done = dict(staging.attrs.get("done", {}))
    resumed = len(done)
    n_chunks = -(-len(candidates) // chunk_size)
    if workers is None:
        workers = 1 if len(candidates) < SERIAL_BELOW else default_workers(n_chunks)
    if not is_shared_store(url):
        workers = 1                            # other processes cannot see a memory:// store

    bar = _progress_bar(progress, n_chunks, "ingest")
    bar(len(done))
    with ChunkRunner(workers) as runner:
        _decode_all(runner, staging, done, url, source, candidates, chunk_size,
                    (image_size, grayscale, max_pixels), bar, verbose)
        good, sums, skipped = _gather(done, len(candidates), chunk_size, skipped_at_scan)
        if not good.any():
            raise ValueError(f"ingest: none of the {len(candidates)} image files in "
                             f"{source!r} could be read; see the reasons:\n" +
                             "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped))
        positions = np.flatnonzero(good)
        labels = np.array([label for _, label in candidates], np.int64)[positions]
        _compact_all(runner, group, url, positions, labels, chunk_size, image_size, channels)

    skipped.sort(key=lambda item: item["path"])
    counts = np.bincount(labels, minlength=len(class_names))
    finalize(group, sums, counts, class_names,
             {"skipped": skipped, "source": os.path.abspath(source), "n_images": len(labels),
              "chunk_size": chunk_size, "image_size": list(image_size), "channels": channels})
    _drop_staging(group)
    summary = StoreSummary.from_group(url, group, time.perf_counter() - started, resumed)
    if verbose:
        print(summary)
    return summary


def _decode_all(runner, staging, done, url, source, candidates, chunk_size, settings, bar,
                verbose):
    """Phase 1: decode every chunk not in `done` into staging, recording each in `done`."""
    jobs = []
    for index in range(-(-len(candidates) // chunk_size)):
        if str(index) not in done:
            start, stop = chunk_bounds(index, chunk_size, len(candidates))
            files = [relative for relative, _ in candidates[start:stop]]
            jobs.append((index, (url, index, source, files, *settings)))
    last_saved = time.monotonic()
    try:
        for index, record in runner.run(_decode_chunk, jobs):
            done[str(index)] = record
            bar(1)
            if verbose:
                for item in record["skipped"]:
                    print(f"skipped {item['path']}: {item['reason']}")
            # the parent alone writes the bookkeeping, at most once a second
            if time.monotonic() - last_saved > 1:
                staging.attrs["done"] = done
                last_saved = time.monotonic()
    finally:                                   # interrupted or not, keep what is done
        staging.attrs["done"] = done


def _gather(done, n_candidates, chunk_size, skipped_at_scan):
    """Which candidates decoded, the pixel sums of those, and every skipped file."""
    good = np.ones(n_candidates, bool)
    sums, skipped = None, list(skipped_at_scan)
    for index in range(-(-n_candidates // chunk_size)):
        record = done[str(index)]
        good[np.asarray(record["failed"], np.int64) + index * chunk_size] = False
        skipped += record["skipped"]
        if record["sums"] is not None:
            sums = add_pixel_sums(sums, record["sums"])
    return good, sums, skipped


def _compact_all(runner, group, url, positions, labels, chunk_size, image_size, channels):
    """Phase 2: copy the good staged images into whole chunks of `images` and `labels`."""
    for name in ("images", "labels"):
        if name in group:
            del group[name]                    # an interrupted compaction: redo it whole
    group.create_array("images", shape=(len(positions), *image_size, channels),
                       chunks=(chunk_size, *image_size, channels), dtype="uint8", fill_value=0)
    group.create_array("labels", shape=(len(positions),), chunks=(chunk_size,), dtype="int64",
                       fill_value=-1)
    jobs = []
    for index in range(-(-len(positions) // chunk_size)):
        start, stop = chunk_bounds(index, chunk_size, len(positions))
        jobs.append((index, (url, index, positions[start:stop], labels[start:stop])))
    for _ in runner.run(_compact_chunk, jobs):
        pass


def _open_or_create(url, plan, overwrite):
    """The store's group: existing from the same plan (resume), or new."""
    group = resumable_group(url, plan, overwrite, "ingest")
    if group is not None:
        return group
    group = zarr.open_group(url, mode="w")
    group.attrs.update({"format": FORMAT, "complete": False, "plan": plan})
    return group


def _drop_staging(group):
    if "_staging" in group:
        del group["_staging"]
