"""Training checkpoints: weights, optimizer state and the data position, in one cnnx archive.

A checkpoint is `<directory>/checkpoint.npz`, a cnnx.nn.archive file: arrays under
"weights/<layer/param>" and "optimizer/<name>", and "meta", a JSON document (epoch, step,
seed, shards, batch size, history, and whatever else the trainer records). The archive
module writes it atomically (temporary file, fsync, rename, fsync of the folder): a crash
leaves either the old checkpoint or the new one, never half of one.  All randomness is keyed
by (seed, epoch, step, shard), so (seed, epoch, step) is the whole RNG state and data position.
"""
import os

from cnnx.nn import archive as archive_format
from cnnx.nn.archive import OPTIMIZER, WEIGHTS

FILENAME = "checkpoint.npz"


def checkpoint_path(directory):
    return os.path.join(os.fspath(directory), FILENAME)


def save_checkpoint(directory, weights, optimizer_state, meta):
    """Write the checkpoint atomically; returns its path.  `meta` is any JSON-able dict
    (NumPy scalars are stored as Python numbers); TypeError, and the old checkpoint kept,
    when it is not."""
    if not isinstance(meta, dict):
        raise TypeError(f"save_checkpoint: meta must be a dict, got {type(meta).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    return archive_format.write_archive(checkpoint_path(directory), weights, optimizer_state,
                                        {"meta": meta})


def load_checkpoint(directory, expected_weights=None, check_meta=None):
    """(weights, optimizer_state, meta) from the checkpoint in `directory`, or None if none.

    expected_weights: optional {name: array} (e.g. {**model.params, **model.state}); the
    checkpoint's weights must have exactly those names, shapes and dtypes, checked before
    any of them is read.  check_meta: optional callable given the meta first (it raises to
    refuse: a resume names the setting that differs before any shape).  A malformed file
    raises cnnx.nn.ArchiveError (a ValueError).
    """
    path = checkpoint_path(directory)
    if not os.path.exists(path):
        return None
    with archive_format.open_archive(path) as archive:
        archive.check_documents(required=["meta"])
        meta = archive.document("meta")
        if not isinstance(meta, dict):
            raise archive.error(f"its meta is a {type(meta).__name__}, not a dict")
        if check_meta is not None:
            check_meta(meta)
        if expected_weights is not None:
            archive.check_group(WEIGHTS, {key: (value.shape, value.dtype) for key, value
                                          in expected_weights.items()}, "the model")
        weights = {key: archive.read(WEIGHTS, key) for key in archive.weights}
        optimizer_state = {key: archive.read(OPTIMIZER, key) for key in archive.optimizer}
    return weights, optimizer_state, meta
