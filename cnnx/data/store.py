"""The cnnx Zarr store format: create, write chunk by chunk, mark complete, open and read.

Layout of a store (a Zarr v3 group):
    images  uint8 (N, H, W, C), chunks (chunk_size, H, W, C), unsharded
    labels  int64 (N,),         chunks (chunk_size,)
    attrs   format, complete, class_names, counts, mean, std (per channel, uint8 scale),
            image_size, channels, source, skipped [{"path", "reason"}], n_images, chunk_size

Images and labels share one chunking so that one writer owns image chunk i and label chunk
i together (zarr 3.1 loses data when two processes write parts of one chunk or shard).
A store is written with `complete: false` and flipped to `complete: true` by one final
attribute write, so a reader never mistakes a half-written store for a finished one.

Every chunk of a complete store exists on disk, even an all-black one (writers store empty
chunks): zarr reads a missing chunk as its fill value, so a deleted file would otherwise
read as black images labelled -1. Readers check each chunk they read (one metadata lookup
for its images and labels together) and refuse a missing or undecodable one by name.
"""
import asyncio
import math
import os

import numpy as np
import zarr
from zarr.core.sync import sync

from cnnx.data.normalize import normalize as _normalize
from cnnx.data.split import stratified_split

FORMAT = 1
DEFAULT_CHUNK_SIZE = 256
# zarr skips writing a chunk that holds only the fill value; a complete store keeps them all
STORE_EVERY_CHUNK = {"write_empty_chunks": True}
REWRITE = "write it again (`cnnx ingest` or `cnnx synth` with --overwrite)"


class DamagedStoreError(ValueError):
    """A chunk of a complete store is missing or cannot be decoded."""


def store_url(store):
    """A string zarr can open in any process: local paths as paths, `file://` stripped."""
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if not isinstance(store, str):
        raise TypeError(f"store must be a path or URL string, got {type(store).__name__}")
    if store.startswith("file://"):
        store = store[len("file://"):]     # LocalStore is faster than fsspec's local wrapper
    return store


def is_shared_store(store):
    """True when other processes can open the store (not an in-process memory:// store)."""
    return not store_url(store).startswith("memory://")


def is_incomplete_store(store):
    """True for a cnnx store whose writer was interrupted before it marked it complete."""
    try:
        attrs = zarr.open_group(store_url(store), mode="r").attrs.asdict()
    except (FileNotFoundError, ValueError):
        return False
    return attrs.get("format") == FORMAT and not attrs.get("complete")


def resumable_group(url, plan, overwrite, who):
    """The group an interrupted writer with the same `plan` left behind, to resume; None when
    there is none (or overwrite is asked); a store made from anything else is refused."""
    if overwrite:
        return None
    try:
        group = zarr.open_group(url, mode="r+")
    except FileNotFoundError:
        return None
    if group.attrs.get("plan") == plan:
        return group
    raise FileExistsError(f"{who}: {url!r} already exists and was made from other files or "
                          "settings; pass overwrite=True (`--overwrite`) to replace it")


def create_store(store, n_images, image_shape, chunk_size, attrs, overwrite=False):
    """Create an empty, incomplete store; returns the zarr group."""
    if n_images <= 0:
        raise ValueError(f"create_store: need at least one image, got n_images={n_images}")
    if chunk_size <= 0:
        raise ValueError(f"create_store: chunk_size must be positive, got {chunk_size}")
    try:
        group = zarr.open_group(store_url(store), mode="w" if overwrite else "w-")
    except FileExistsError:
        raise FileExistsError(f"{store_url(store)!r} already exists; pass overwrite=True "
                              "(`--overwrite`) to replace it") from None
    height, width, channels = image_shape
    group.create_array("images", shape=(n_images, height, width, channels),
                       chunks=(chunk_size, height, width, channels), dtype="uint8",
                       fill_value=0)
    group.create_array("labels", shape=(n_images,), chunks=(chunk_size,), dtype="int64",
                       fill_value=-1)
    group.attrs.update({**attrs, "format": FORMAT, "complete": False,
                        "n_images": int(n_images), "chunk_size": int(chunk_size),
                        "image_size": [int(height), int(width)], "channels": int(channels)})
    return group


def chunk_bounds(index, chunk_size, n_images):
    """(start, stop) of chunk `index`; the last chunk may be short."""
    start = index * chunk_size
    return start, min(start + chunk_size, n_images)


def write_chunk(group, index, images, labels):
    """Write whole chunk `index` of images and labels (the caller owns this chunk)."""
    chunk_size = group["images"].chunks[0]
    start, stop = chunk_bounds(index, chunk_size, group["images"].shape[0])
    if len(images) != stop - start or len(labels) != stop - start:
        raise ValueError(f"write_chunk: chunk {index} holds {stop - start} images, "
                         f"got {len(images)} images and {len(labels)} labels")
    group["images"].with_config(STORE_EVERY_CHUNK)[start:stop] = images
    group["labels"].with_config(STORE_EVERY_CHUNK)[start:stop] = labels


def pixel_sums(images):
    """Exact per-channel pixel count, sum and sum of squares of a uint8 batch (N, H, W, C).

    Python ints, so partial sums from any number of chunks combine exactly in any order."""
    flat = images.reshape(-1, images.shape[-1])
    sums = flat.sum(axis=0, dtype=np.int64)
    squares = np.einsum("ij,ij->j", flat, flat, dtype=np.int64)
    return {"count": int(flat.shape[0]), "sum": [int(s) for s in sums],
            "sumsq": [int(s) for s in squares]}


def add_pixel_sums(a, b):
    if a is None:
        return b
    return {"count": a["count"] + b["count"],
            "sum": [x + y for x, y in zip(a["sum"], b["sum"])],
            "sumsq": [x + y for x, y in zip(a["sumsq"], b["sumsq"])]}


def mean_std(sums):
    """Per-channel mean and std (population) from pixel_sums."""
    count = sums["count"]
    mean = [s / count for s in sums["sum"]]
    std = [math.sqrt(max(q / count - m * m, 0.0)) for q, m in zip(sums["sumsq"], mean)]
    return mean, std


def channel_stats(images):
    """Per-channel (mean, std) arrays of uint8 images (..., C), on the uint8 scale: what
    normalize(mode="standardize") takes, computed exactly as a store computes its own."""
    mean, std = mean_std(pixel_sums(images))
    return np.array(mean), np.array(std)


def finalize(group, sums, labels_count, class_names, extra_attrs=None):
    """Write the statistics, then mark the store complete in the same final attribute write."""
    mean, std = mean_std(sums)
    attrs = dict(extra_attrs or {})
    attrs.update({"class_names": list(class_names),
                  "counts": [int(c) for c in labels_count],
                  "mean": mean, "std": std, "complete": True})
    group.attrs.update(attrs)


class Dataset:
    """A complete cnnx store opened for reading; picklable (workers reopen it by `store`)."""

    def __init__(self, store):
        self.store = store_url(store)
        try:
            group = zarr.open_group(self.store, mode="r")
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"open_dataset: no Zarr group at {self.store!r} "
                "(did `cnnx ingest` finish?)") from error
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise ValueError(f"open_dataset: {self.store!r} is a Zarr group but not a cnnx "
                             f"image store (no attribute format={FORMAT})")
        if not attrs.get("complete"):
            raise ValueError(
                f"open_dataset: store {self.store!r} is incomplete (an ingest or synth run was "
                "interrupted); re-run the same command to finish it, it resumes where it stopped")
        if "images" not in group or "labels" not in group:
            raise ValueError(f"open_dataset: cnnx store {self.store!r} lacks its images or "
                             "labels array")
        self.attrs = attrs
        self._images = group["images"]
        self._labels = group["labels"]
        self._all_labels = None
        self.image_shape = tuple(int(s) for s in self._images.shape[1:])
        self.chunk_size = int(self._images.chunks[0])
        if self._labels.shape != (len(self),) or self._labels.chunks != (self.chunk_size,):
            raise DamagedStoreError(
                f"open_dataset: store {self.store!r} holds {len(self)} images in chunks of "
                f"{self.chunk_size} but labels of shape {self._labels.shape} in chunks of "
                f"{self._labels.chunks}; they must match: {REWRITE}")
        self.n_chunks = math.ceil(len(self) / self.chunk_size)
        self.class_names = tuple(attrs["class_names"])
        self.counts = tuple(attrs["counts"])
        self.mean = np.asarray(attrs["mean"], np.float32)
        self.std = np.asarray(attrs["std"], np.float32)
        self.skipped = attrs.get("skipped", [])

    def __len__(self):
        return int(self._images.shape[0])

    def __repr__(self):
        return (f"Dataset({self.store!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"classes={list(self.class_names)}, chunk_size={self.chunk_size})")

    def __getstate__(self):
        return {"store": self.store}

    def __setstate__(self, state):
        self.__init__(state["store"])

    def chunk_bounds(self, index):
        """(start, stop) image indices of chunk `index`."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"Dataset has {self.n_chunks} chunks, got chunk index {index}")
        return chunk_bounds(index, self.chunk_size, len(self))

    def read_chunk(self, index):
        """Images uint8 (n, H, W, C) and labels int64 (n,) of chunk `index`."""
        start, stop = self.chunk_bounds(index)
        return self._read_within_chunk(index, start, stop)

    def _read_within_chunk(self, chunk, low, high, names=("images", "labels")):
        """Arrays `names` over [low, high), all inside chunk `chunk`; a missing or
        undecodable chunk file raises DamagedStoreError naming it."""
        arrays = [{"images": self._images, "labels": self._labels}[name] for name in names]
        keys = [array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
                for array in arrays]
        found = sync(_all_exist([array.store_path / key for array, key in zip(arrays, keys)]))
        missing = [f"{name}/{key}" for name, key, ok in zip(names, keys, found) if not ok]
        if missing:
            raise DamagedStoreError(
                f"Dataset {self.store!r}: chunk {chunk} is missing {' and '.join(missing)}; "
                f"the store is damaged: {REWRITE}")
        read = []
        for name, key, array in zip(names, keys, arrays):
            try:
                read.append(array[low:high])
            except (RuntimeError, ValueError, TypeError) as error:   # zarr's codec errors
                raise DamagedStoreError(
                    f"Dataset {self.store!r}: chunk file {name}/{key} (chunk {chunk}) is "
                    f"corrupt and cannot be decoded ({error}); {REWRITE}") from error
        return tuple(read)

    def read(self, indices):
        """Images and labels at `indices` (any order, repeats allowed), in that order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"Dataset.read: indices must lie in [0, {len(self)}), "
                             f"got min {indices.min()} and max {indices.max()}")
        images = np.empty((indices.size, *self.image_shape), np.uint8)
        labels = np.empty(indices.size, np.int64)
        chunk_of = indices // self.chunk_size
        for chunk in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == chunk)
            wanted = indices[where]
            # one contiguous read per chunk: zarr decodes the whole chunk either way
            low, high = int(wanted.min()), int(wanted.max()) + 1
            chunk_images, chunk_labels = self._read_within_chunk(int(chunk), low, high)
            images[where] = chunk_images[wanted - low]
            labels[where] = chunk_labels[wanted - low]
        return images, labels

    @property
    def labels(self):
        """All labels, int64 (N,) (read once, then cached)."""
        if self._all_labels is None:
            try:
                labels = self._labels[:]
            except (RuntimeError, ValueError, TypeError):
                self._check_label_chunks()                 # raises, naming the bad chunk
                raise
            if (labels < 0).any():                         # -1: zarr's fill for a lost chunk
                self._check_label_chunks()
                raise DamagedStoreError(f"Dataset {self.store!r}: negative labels; labels "
                                        f"must be class indices: {REWRITE}")
            self._all_labels = labels
        return self._all_labels

    def _check_label_chunks(self):
        for chunk in range(self.n_chunks):
            self._read_within_chunk(chunk, *self.chunk_bounds(chunk), names=("labels",))

    def normalize(self, images, mode="standardize"):
        """uint8 images -> float32 with this store's per-channel mean and std."""
        return _normalize(images, mode, mean=self.mean, std=self.std)

    def split(self, train=0.8, val=0.1, test=0.1, seed=0):
        """Stratified, deterministic (train, val, test) index arrays, each sorted."""
        return stratified_split(self.labels, train, val, test, seed)


async def _all_exist(paths):
    return await asyncio.gather(*(path.exists() for path in paths))


def open_dataset(store):
    """Open a complete cnnx store (local path, `file://`, `memory://`, `s3://` ... URL)."""
    return Dataset(store)
