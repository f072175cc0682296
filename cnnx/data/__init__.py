"""Zarr image stores: ingest, open, read, normalise, split, augment; bundled and synthetic data."""
from cnnx.data.datasets import (ArrayDataset, ingest_arrays, load_fashion_mnist, load_faces,
                                read_idx)
from cnnx.data.normalize import normalize
from cnnx.data.split import stratified_split
from cnnx.data.store import Dataset, open_dataset
from cnnx.data.summary import StoreSummary

__all__ = ["ArrayDataset", "Dataset", "StoreSummary", "ingest_arrays", "load_faces",
           "load_fashion_mnist", "normalize", "open_dataset", "read_idx", "stratified_split"]
