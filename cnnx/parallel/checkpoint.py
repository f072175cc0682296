"""Atomic, pickle-free training checkpoints: weights, optimizer state and the data position.

A checkpoint is one `.npz`: arrays under "weights/<layer/param>" and "optimizer/<name>",
and "meta", a JSON string (epoch, step, seed, shards, batch size, history). It is written
to a temporary file in the same folder, fsynced, renamed over the old one, and the folder
is fsynced: a crash leaves either the old checkpoint or the new one, never half of one.
All randomness is keyed by (seed, epoch, step, shard), so (seed, epoch, step) is the whole
RNG state and data position.
"""
import json
import os
import tempfile

import numpy as np

FILENAME = "checkpoint.npz"


def checkpoint_path(directory):
    return os.path.join(os.fspath(directory), FILENAME)


def save_checkpoint(directory, weights, optimizer_state, meta):
    """Write the checkpoint atomically; returns its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    arrays = {f"weights/{name}": np.asarray(a) for name, a in weights.items()}
    arrays.update({f"optimizer/{name}": np.asarray(a) for name, a in optimizer_state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    descriptor, temporary = tempfile.mkstemp(prefix=".checkpoint-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        final = checkpoint_path(directory)
        os.replace(temporary, final)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return final


def load_checkpoint(directory):
    """(weights, optimizer_state, meta) from the checkpoint in `directory`, or None if none."""
    path = checkpoint_path(directory)
    if not os.path.exists(path):
        return None
    weights, optimizer_state = {}, {}
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        for key in archive.files:
            group, _, name = key.partition("/")
            if group == "weights":
                weights[name] = archive[key]
            elif group == "optimizer":
                optimizer_state[name] = archive[key]
    return weights, optimizer_state, meta
