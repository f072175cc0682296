"""Pure functions run on Dask workers: read a shard's images, compute gradient sums, reduce.

Design: a task gets the store location and the sample indices of one virtual shard, never
image arrays. Each worker process keeps the datasets it opened and a bounded LRU of decoded
chunks, so after the first epoch no image bytes move. Everything random is drawn from
generators keyed by (seed, epoch, step, shard): a shard computes the same bits on any worker,
which is what makes a synchronous run independent of the worker count.
"""
import collections
import threading
import time

import numpy as np

from cnnx.parallel import wire
from cnnx.parallel.factors import KernelFactors

_lock = threading.Lock()                  # one model per worker process: one task uses it at a time
_datasets = {}                            # store -> opened dataset
_chunks = collections.OrderedDict()       # (store, chunk id) -> (images uint8, labels int64)
_cache = {"bytes": 0, "hits": 0, "misses": 0, "bytes_read": 0}

AUGMENT_STREAM = 0xA06                    # keeps augmentation draws apart from dropout draws


class StoreError(OSError):
    """A worker could not open or read the image store."""


class NonFiniteGradientError(FloatingPointError):
    """A shard produced NaN or infinite gradients or loss."""


def worker_name():
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return "the driver process"


def open_store(store, opener):
    """The dataset at `store`, opened once per worker process."""
    dataset = _datasets.get(store)
    if dataset is None:
        try:
            dataset = opener(store)
        except Exception as error:
            raise StoreError(f"worker {worker_name()} cannot open the image store {store!r}: "
                             f"{type(error).__name__}: {error}") from error
        _datasets[store] = dataset
    return dataset


def read_chunk(dataset, store, chunk, cache_bytes):
    """Chunk `chunk` of the store, from this worker's LRU cache when it holds it."""
    key = (store, int(chunk))
    cached = _chunks.get(key)
    if cached is not None:
        _chunks.move_to_end(key)
        _cache["hits"] += 1
        return cached
    images, labels = dataset.read_chunk(int(chunk))
    _cache["misses"] += 1
    _cache["bytes_read"] += images.nbytes
    if images.nbytes <= cache_bytes:
        _chunks[key] = (images, labels)
        _cache["bytes"] += images.nbytes
        while _cache["bytes"] > cache_bytes:
            _, (old, _) = _chunks.popitem(last=False)
            _cache["bytes"] -= old.nbytes
    return images, labels


def cache_info():
    """This worker's chunk cache: bytes held, hits, misses, image bytes read from the store."""
    return dict(_cache, chunks=len(_chunks))


def clear_cache():
    _chunks.clear()
    _datasets.clear()
    _cache.update(bytes=0, hits=0, misses=0, bytes_read=0)


def load_batch(spec):
    """uint8 images and int64 labels of the samples `spec["indices"]`, in that order."""
    dataset = open_store(spec["store"], spec["opener"])
    indices = np.asarray(spec["indices"], np.int64)
    chunk_size = int(dataset.chunk_size)
    chunk_of = indices // chunk_size
    images = np.empty((len(indices), *dataset.image_shape), np.uint8)
    labels = np.empty(len(indices), np.int64)
    for chunk in np.unique(chunk_of):
        try:
            chunk_images, chunk_labels = read_chunk(dataset, spec["store"], chunk,
                                                    spec["cache_bytes"])
        except StoreError:
            raise
        except Exception as error:
            raise StoreError(f"worker {worker_name()} cannot read chunk {int(chunk)} of the image "
                             f"store {spec['store']!r}: {type(error).__name__}: {error}") from error
        rows = chunk_of == chunk
        local = indices[rows] - chunk * chunk_size
        images[rows] = chunk_images[local]
        labels[rows] = chunk_labels[local]
    return dataset, images, labels


def prepare_batch(spec, key):
    """Normalised (and augmented, with a keyed generator) float32 images and labels."""
    dataset, images, labels = load_batch(spec)
    x = dataset.normalize(images, spec["normalize"])
    if spec.get("augment") is not None:
        x = spec["augment"](x, np.random.default_rng((spec["seed"], AUGMENT_STREAM, *key)))
    return x, labels


def timed_batch(spec, key):
    """(x, y, seconds): prepare_batch as a task of its own, so a worker reads, normalises
    and augments a shard while it would otherwise wait for the step before."""
    start = time.perf_counter()
    x, y = prepare_batch(spec, key)
    return x, y, time.perf_counter() - start


def _load_weights(model, weights):
    model.set_weights(wire.decode(weights))


def check_finite(gradient_sum, key):
    epoch, step, shard = key
    bad = [name for name, g in gradient_sum.grads.items()
           if not (g.all_finite() if isinstance(g, KernelFactors) else np.isfinite(g).all())]
    if bad or not np.isfinite(gradient_sum.loss_sum):
        what = f"gradients of {', '.join(bad[:3])}" if bad else "the loss"
        raise NonFiniteGradientError(
            f"shard {shard} of step {step} (epoch {epoch}) produced non-finite {what} "
            f"on worker {worker_name()}")


def shard_gradient(model, weights, spec, key, wire_dtype="float32"):
    """(GradientSum of one virtual shard, stats). key = (epoch, step, shard)."""
    start = time.perf_counter()
    x, y = prepare_batch(spec, key)
    read_s = time.perf_counter() - start
    with _lock:
        _load_weights(model, weights)
        start = time.perf_counter()
        result = model.gradient(x, y, key=tuple(key))
        compute_s = time.perf_counter() - start
    check_finite(result, key)
    # encode copies: a layer's backward overwrites its grads, and this result outlives the task
    result.grads = wire.encode(result.grads, wire_dtype)
    return result, leaf_stats(compute_s, read_s)


def leaf_stats(compute_s, read_s, apply_s=0.0, cpu_s=None):
    """What one shard task reports; sum_pair combines them up the tree. cpu_s: the task
    thread's CPU seconds (compute, apply), below the wall times when the core was shared."""
    compute_cpu_s, apply_cpu_s = cpu_s or (compute_s, apply_s)
    return {"compute_s": compute_s, "read_s": read_s, "max_compute_s": compute_s,
            "max_apply_s": apply_s, "tasks": 1, "worker": {worker_name(): 1},
            "max_compute_cpu_s": compute_cpu_s, "max_apply_cpu_s": apply_cpu_s}


def sum_pair(left, right):
    """left + right in that order: the reduction tree fixes the order, hence the bits."""
    (a, stats_a), (b, stats_b) = left, right
    # the inputs stay untouched in worker memory: a rerun of this task must see the same bits
    total = wire.decoded(a) + wire.decoded(b)
    total.grads = wire.encode(total.grads, wire.dtype_of(a.grads), copy=False)   # fresh sums
    workers = collections.Counter(stats_a["worker"]) + collections.Counter(stats_b["worker"])
    stats = {"compute_s": stats_a["compute_s"] + stats_b["compute_s"],
             "read_s": stats_a["read_s"] + stats_b["read_s"],
             "max_compute_s": max(stats_a["max_compute_s"], stats_b["max_compute_s"]),
             "max_apply_s": max(stats_a.get("max_apply_s", 0.0), stats_b.get("max_apply_s", 0.0)),
             **{name: max(stats_a.get(name, 0.0), stats_b.get(name, 0.0))
                for name in ("max_compute_cpu_s", "max_apply_cpu_s")},
             "tasks": stats_a["tasks"] + stats_b["tasks"], "worker": dict(workers)}
    return total, stats


def local_sgd(model, weights, specs, keys, learning_rate, wire_dtype="float32"):
    """Plain SGD over the batches `specs` starting from `weights` (EASGD / ADAG workers):
    the model's own training step (Sequential.gradient, then apply_gradient_sum: mean loss
    gradient + regulariser, BatchNorm statistics) with SGD(learning_rate) as its optimizer.

    Returns (new weights, loss_sum, n_correct, n_samples, compute seconds, worker)."""
    from cnnx import optim

    batches = [prepare_batch(spec, key) for spec, key in zip(specs, keys)]
    loss_sum, n_correct, n_samples = 0.0, 0, 0
    with _lock:
        _load_weights(model, weights)
        model.optimizer = optim.SGD(learning_rate)     # this worker's copy steps on its own
        start = time.perf_counter()
        for (x, y), key in zip(batches, keys):
            result = model.gradient(x, y, key=tuple(key))
            check_finite(result, key)                   # before any weight changes
            model.apply_gradient_sum(result)
            loss_sum += float(result.loss_sum)
            n_correct += int(result.n_correct)
            n_samples += int(result.n_samples)
        compute_s = time.perf_counter() - start
        params = model.get_weights()
    return (wire.encode(params, wire_dtype, copy=False), loss_sum, n_correct, n_samples,
            compute_s, worker_name())


def evaluate_batch(model, weights, spec):
    """(loss_sum, n_correct, n_samples) of the model in inference mode on spec's samples."""
    return evaluate_model(spec, lambda: _load_weights(model, weights) or model)


def evaluate_model(spec, ready_model):
    """evaluate_batch's work; ready_model() (called under the lock) gives the model to use."""
    dataset, images, labels = load_batch(spec)
    x = dataset.normalize(images, spec["normalize"])
    with _lock:
        model = ready_model()
        outputs = model.predict(x)
    # the model's own loss: softmax + sparse cross-entropy or one sigmoid unit + binary
    loss_sum = float(model.loss(outputs, labels)[0])
    return loss_sum, model.loss.n_correct(outputs, labels), len(labels)
