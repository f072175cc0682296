"""Ingest a folder of images (one sub-folder per class) into a cnnx store, in parallel,
resumably, skipping and reporting every file that is not a usable image.

The source is a local folder or any fsspec URL (sources.py); the chunks are decoded on this
process, on local processes or on Dask workers, through one runner interface (chunks.py).
Two phases, both resumable:
  1. decode: candidate files (shuffled once, deterministically, so every chunk mixes the
     classes) are cut into chunks; a task decodes chunk i and writes it to the staging
     array `_staging/images` (one slot per candidate), returning which files failed and
     the pixel sums of the good ones. The driver records each finished chunk in the
     staging attributes, so a re-run decodes only the chunks not recorded.
  2. compact: tasks copy the good images, chunk by chunk, into the final `images` and
     `labels`; then the driver writes the statistics and marks the store complete.
Every task is a pure function of its arguments and owns its output chunk, so the store is
the same bytes whichever processes or workers ran which tasks, in whatever order.
"""
import hashlib
import json
import os
import time
from contextlib import contextmanager

import numpy as np
import zarr

from cnnx.data.chunks import check_not_bootstrapping, chunk_runner, default_workers
from cnnx.data.datasets import _progress_bar
from cnnx.data.decode import DEFAULT_MAX_PIXELS, BadImage, decode_image, load_image
from cnnx.data.lock import store_lock
from cnnx.data.sources import IMAGE_EXTENSIONS, ImageSource, is_in_process
from cnnx.data.store import (DEFAULT_CHUNK_SIZE, FORMAT, add_pixel_sums, chunk_bounds,
                             finalize, pixel_sums, resumable_group, store_url, write_chunk)
from cnnx.data.summary import StoreSummary

__all__ = ["BadImage", "IMAGE_EXTENSIONS", "ingest", "load_image"]

SERIAL_BELOW = 512             # spawning workers costs ~1-2 s: small folders ingest in-process


def _plan_key(candidates, versions, image_size, grayscale, chunk_size, max_pixels, seed):
    """Fingerprint of everything that decides the store's content, to resume safely."""
    digest = hashlib.sha256()
    for relative, label in candidates:
        digest.update(f"{relative}\0{label}\0{versions[relative]}\n".encode())
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
            images[offset] = decode_image(source.read(relative), image_size, grayscale,
                                          max_pixels)
        except BadImage as error:
            failed.append(offset)
            skipped.append({"path": relative, "reason": str(error)})
    staging = zarr.open_array(store, path="_staging/images", mode="r+")
    start = index * staging.chunks[0]
    staging[start:start + len(files)] = images
    good = np.delete(images, failed, axis=0)
    return {"failed": failed, "skipped": skipped,
            "sums": pixel_sums(good) if len(good) else None}


def _compact_chunk(store, index, positions, labels):
    """Phase 2 task: copy the good images at staging `positions` into final chunk `index`."""
    group = zarr.open_group(store, mode="r+")
    low, high = int(positions[0]), int(positions[-1]) + 1
    images = group["_staging/images"][low:high][positions - low]
    write_chunk(group, index, images, labels)      # stored even when every pixel is black
    return len(images)


def _probe_worker(store, plan, source, relative):
    """Run on every Dask worker: None when it sees the store being written and the source."""
    try:
        found = zarr.open_group(store, mode="r").attrs.get("plan")
    except Exception as error:
        return f"cannot open the store {store!r} ({type(error).__name__}: {error})"
    if found != plan:
        return f"sees another store at {store!r} than this ingest writes (another disk?)"
    try:
        source.fs.info(source.path(relative))
    except Exception as error:
        return f"cannot read the source {source.url!r} ({type(error).__name__}: {error})"
    return None


def _check_reachable(client, store, plan, source, relative):
    problems = client.run(_probe_worker, store, plan, source, relative)
    for worker, problem in sorted(problems.items()):
        if problem is not None:
            raise ValueError(
                f"ingest: Dask worker {worker} {problem}; the store and the source must be "
                "reachable from every worker: a shared file system or an object-store URL "
                "(memory:// works only in this process, local paths only on this machine)")


def ingest(source, store, image_size=(80, 80), grayscale=False, chunk_size=DEFAULT_CHUNK_SIZE,
           workers=None, overwrite=False, max_pixels=DEFAULT_MAX_PIXELS, seed=0,
           progress=False, verbose=False, client=None):
    """Ingest `source/<class>/<images>` into the store; returns a StoreSummary.

    `source` is a local folder, a `file://` or any fsspec URL; classes are its sorted
    sub-folder names. Images are decoded with Pillow (JPEGs at reduced scale when
    shrinking), converted to RGB (or grey with grayscale=True), resized with anti-aliasing
    to `image_size` and stored as uint8 in a random (seeded) order so every chunk mixes the
    classes. Unusable files are skipped and listed with their reason in the summary and the
    store's `skipped` attribute. Chunks are decoded by `workers` local processes (default:
    all cores for large folders), or, given a Dask `client` (a Client or a scheduler
    address), by one task per chunk on its workers, which must reach the source and the
    store. Either way the store holds the same bytes. Re-running after an interruption
    resumes; re-running on a complete store built from the same files and settings returns
    its summary. `progress`: True for a tqdm bar, or a callable(done_chunks, total_chunks).
    """
    check_not_bootstrapping("data.ingest")
    if client is not None and workers is not None:
        raise ValueError(f"ingest: workers={workers} counts local processes, but client= "
                         "decodes on the Dask cluster's workers; pass one of them")
    started = time.perf_counter()
    source = ImageSource(source)
    image_size = tuple(int(s) for s in image_size)
    url = store_url(store)
    target = url if "://" in url else os.path.abspath(url)   # what every worker opens
    class_names, candidates, skipped_at_scan, versions = source.scan()
    order = np.random.default_rng(seed).permutation(len(candidates))
    candidates = [candidates[i] for i in order]
    plan = _plan_key(candidates, versions, image_size, grayscale, chunk_size, max_pixels, seed)
    with store_lock(url, "ingest"), _connected(client, verbose) as client:
        group = _open_or_create(url, plan, overwrite)
        if group.attrs.get("complete"):
            _drop_staging(group)
            return StoreSummary.from_group(
                url, group, time.perf_counter() - started,
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
        if client is not None:
            _check_reachable(client, target, plan, source, candidates[0][0])
        elif workers is None:
            workers = 1 if len(candidates) < SERIAL_BELOW else default_workers(n_chunks)
        if is_in_process(url) or is_in_process(source.url):
            workers = 1                        # other processes cannot see memory://

        bar = _progress_bar(progress, n_chunks, "ingest")
        bar(len(done))
        with chunk_runner(workers, client, "data.ingest") as runner:
            _decode_all(runner, staging, done, target, source, candidates, chunk_size,
                        (image_size, grayscale, max_pixels), bar, verbose)
            good, sums, skipped = _gather(done, len(candidates), chunk_size, skipped_at_scan)
            if not good.any():
                raise ValueError(f"ingest: none of the {len(candidates)} image files in "
                                 f"{source.url!r} could be read; see the reasons:\n" +
                                 "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped))
            positions = np.flatnonzero(good)
            labels = np.array([label for _, label in candidates], np.int64)[positions]
            _compact_all(runner, group, target, positions, labels, chunk_size, image_size,
                         channels)

        skipped.sort(key=lambda item: item["path"])
        counts = np.bincount(labels, minlength=len(class_names))
        finalize(group, sums, counts, class_names,
                 {"skipped": skipped, "source": source.url, "n_images": len(labels),
                  "chunk_size": chunk_size, "image_size": list(image_size),
                  "channels": channels})
        _drop_staging(group)
    summary = StoreSummary.from_group(url, group, time.perf_counter() - started, resumed)
    if verbose:
        print(summary)
    return summary


@contextmanager
def _connected(client, verbose):
    """A Dask Client from a Client or a scheduler address (closed after), or None."""
    if client is None or not isinstance(client, str):
        yield client
        return
    from cnnx.parallel.cluster import connect
    connected, _ = connect(client, echo=print if verbose else (lambda *args: None),
                           who="ingest")
    try:
        yield connected
    finally:
        connected.close()


def _decode_all(runner, staging, done, target, source, candidates, chunk_size, settings, bar,
                verbose):
    """Phase 1: decode every chunk not in `done` into staging, recording each in `done`."""
    jobs = []
    for index in range(-(-len(candidates) // chunk_size)):
        if str(index) not in done:
            start, stop = chunk_bounds(index, chunk_size, len(candidates))
            files = [relative for relative, _ in candidates[start:stop]]
            jobs.append((index, (target, index, source, files, *settings)))
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


def _compact_all(runner, group, target, positions, labels, chunk_size, image_size, channels):
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
        jobs.append((index, (target, index, positions[start:stop], labels[start:stop])))
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
