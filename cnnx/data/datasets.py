"""Datasets that need no download (scikit-image's faces, Debian's Fashion-MNIST) and
`ingest_arrays`, which writes any in-memory arrays to a store."""
import gzip
import os
import time
from typing import NamedTuple

import numpy as np

from cnnx.data.split import stratified_split
from cnnx.data.store import (DEFAULT_CHUNK_SIZE, add_pixel_sums, chunk_bounds, create_store,
                             finalize, is_incomplete_store, pixel_sums, store_url,
                             write_chunk)
from cnnx.data.summary import StoreSummary

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class ArrayDataset(NamedTuple):
    """Images uint8 (N, H, W, C), labels int64 (N,), class names; unpacks as a 3-tuple."""
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple

    def split(self, train=0.8, val=0.1, test=0.1, seed=0):
        return stratified_split(self.labels, train, val, test, seed)

    def to_store(self, store, **kwargs):
        return ingest_arrays(self.images, self.labels, store, class_names=self.class_names,
                             **kwargs)


def as_uint8_images(x):
    """(N, H, W) or (N, H, W, C) uint8, or floats in [0, 1] -> uint8 (N, H, W, C)."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or np.isnan(x).any()):
            raise ValueError("float images must lie in [0, 1] (they are stored as uint8)")
        return np.round(x * 255).astype(np.uint8)
    raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")


def ingest_arrays(x, y, store, class_names=None, chunk_size=DEFAULT_CHUNK_SIZE,
                  source="arrays", overwrite=False, progress=False, verbose=False):
    """Write images `x` and integer labels `y` to a complete store; returns a StoreSummary."""
    started = time.perf_counter()
    images = as_uint8_images(x)
    labels = np.asarray(y).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"ingest_arrays: x has {len(images)} samples but y has {len(labels)}")
    if len(images) == 0:
        raise ValueError("ingest_arrays: no samples to write")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("ingest_arrays: y must hold non-negative integer class indices")
    labels = labels.astype(np.int64)
    n_classes = int(labels.max()) + 1
    if class_names is None:
        class_names = [str(i) for i in range(n_classes)]
    if len(class_names) < n_classes:
        raise ValueError(f"ingest_arrays: labels go up to {n_classes - 1} but only "
                         f"{len(class_names)} class names were given")
    # an interrupted earlier call left an incomplete store: every byte is in memory, so
    # finishing it means writing it again
    group = create_store(store, len(images), images.shape[1:], chunk_size,
                         {"source": str(source), "skipped": []},
                         overwrite=overwrite or is_incomplete_store(store))
    n_chunks = -(-len(images) // chunk_size)
    sums = None
    bar = _progress_bar(progress, n_chunks, "write")
    for index in range(n_chunks):
        start, stop = chunk_bounds(index, chunk_size, len(images))
        write_chunk(group, index, images[start:stop], labels[start:stop])
        sums = add_pixel_sums(sums, pixel_sums(images[start:stop]))
        bar(1)
    counts = np.bincount(labels, minlength=len(class_names))
    finalize(group, sums, counts, class_names)
    summary = StoreSummary.from_group(store_url(store), group, time.perf_counter() - started)
    if verbose:
        print(summary)
    return summary


def _progress_bar(progress, total, description):
    """An update(n) callable: tqdm when progress is True, the callable itself, or a no-op."""
    if callable(progress):
        done = [0]

        def update(n):
            done[0] += n
            progress(done[0], total)
        return update
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=description, unit="chunk")

        def update(n):
            bar.update(n)
            if bar.n >= total:
                bar.close()
        return update
    return lambda n: None


def load_faces():
    """scikit-image's bundled LFW subset: 200 grey 25x25 images, faces (0) and non-faces (1).

    Too easy to measure anything (a logistic regression scores 100%); meant for a first run.
    """
    from skimage.data import lfw_subset
    images = lfw_subset()                    # (200, 25, 25) float64 in [0, 1]; rows 0-99 faces
    labels = np.repeat(np.array([0, 1], np.int64), [100, len(images) - 100])
    return ArrayDataset(as_uint8_images(images), labels, ("face", "non_face"))


IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an IDX file (the MNIST format), gzip-compressed or not, into an array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (bad magic {data[:4]!r})")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"read_idx: {path} holds {len(data)} bytes, its header {shape} "
                         f"{dtype} needs {expected} (truncated or corrupt)")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


IDX_CODES = {np.dtype(code): number for number, code in IDX_DTYPES.items()}


def write_idx(path, array):
    """Write `array` as an IDX file (gzip-compressed when `path` ends in .gz, with no
    timestamp, so the same array always gives the same bytes)."""
    array = np.asarray(array)
    stored = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if stored not in IDX_CODES:
        raise TypeError(f"write_idx: IDX holds {sorted(str(d) for d in IDX_CODES)}, "
                        f"got dtype {array.dtype}")
    header = bytes([0, 0, IDX_CODES[stored], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + array.astype(stored).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(payload)


def _find_idx(directory, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def load_fashion_mnist(path=None, subset=None):
    """Fashion-MNIST: 60000 training + 10000 test grey 28x28 images.

    subset None: (train, test) ArrayDatasets; "train", "test": that part; "all": both in
    one ArrayDataset (train first). Reads the IDX files of Debian's `dataset-fashion-mnist`
    package (/usr/share/datasets/fashion-mnist) or of the directory `path`.
    """
    if subset not in (None, "train", "test", "all"):
        raise ValueError(f"load_fashion_mnist: subset must be None, 'train', 'test' or 'all', "
                         f"got {subset!r}")
    directory = FASHION_MNIST_DIR if path is None else os.fspath(path)
    parts = []
    for prefix in ("train", "t10k"):     # (reading both costs ~0.5 s; simplicity wins)
        image_file = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        label_file = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        if image_file is None or label_file is None:
            raise FileNotFoundError(
                f"load_fashion_mnist: no {prefix}-images-idx3-ubyte[.gz] / "
                f"{prefix}-labels-idx1-ubyte[.gz] in {directory}; install them with "
                "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass "
                "path= to a directory holding the IDX files")
        images, labels = read_idx(image_file), read_idx(label_file)
        if len(images) != len(labels):
            raise ValueError(f"load_fashion_mnist: {image_file} has {len(images)} images but "
                             f"{label_file} has {len(labels)} labels")
        parts.append(ArrayDataset(as_uint8_images(images), labels.astype(np.int64),
                                  FASHION_MNIST_CLASSES))
    train, test = parts
    if subset == "all":
        return ArrayDataset(np.concatenate([train.images, test.images]),
                            np.concatenate([train.labels, test.labels]), FASHION_MNIST_CLASSES)
    return {"train": train, "test": test, None: (train, test)}[subset]
