"""Zarr image stores: ingest, open, read, normalise, split, augment; bundled and synthetic data."""
from cnnx.data.augment import Augment
from cnnx.data.datasets import (ArrayDataset, ingest_arrays, load_fashion_mnist, load_faces,
                                read_idx)
from cnnx.data.decode import BadImage, decode_image, load_image
from cnnx.data.ingest import ingest
from cnnx.data.normalize import normalize
from cnnx.data.split import stratified_split
from cnnx.data.store import DamagedStoreError, Dataset, channel_stats, open_dataset
from cnnx.data.summary import StoreSummary
from cnnx.data.synthetic import draw_faces, make_synthetic

__all__ = ["ArrayDataset", "Augment", "BadImage", "DamagedStoreError", "Dataset",
           "StoreSummary", "channel_stats", "decode_image", "draw_faces", "ingest",
           "ingest_arrays", "load_faces", "load_fashion_mnist", "load_image", "make_synthetic",
           "normalize", "open_dataset", "read_idx", "stratified_split"]
