"""Distributed training on Dask: synchronous and asynchronous drivers, checkpoints."""
from cnnx.parallel.checkpoint import load_checkpoint, save_checkpoint
from cnnx.parallel.cluster import connect, start_local_cluster
from cnnx.parallel.modes import ADAG, EASGD, Downpour, DynSGD, Sync
from cnnx.parallel.trainer import MODES, DaskTrainer
from cnnx.parallel.worker import NonFiniteGradientError, StoreError

__all__ = ["DaskTrainer", "MODES", "Sync", "Downpour", "DynSGD", "ADAG", "EASGD", "connect",
           "start_local_cluster", "save_checkpoint", "load_checkpoint", "NonFiniteGradientError",
           "StoreError"]
