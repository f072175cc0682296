"""A training run as the `cnnx` command performs it: data, model, cluster, files left behind.

A run folder holds:
  run.json          what is needed to reuse the model: data, split, normalisation, classes
  model.npz         weights + architecture + optimizer state (no pickle); architecture.json
  history.csv       one row per epoch (loss, accuracy, validation, images/s, bytes moved)
  curves.png        loss and accuracy, train and validation
  confusion.png     the test set's confusion matrix
  report.md         configuration, timings, throughput, traffic, final metrics
  checkpoints/      atomic checkpoints for --resume
"""
import contextlib
import csv
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import threading
import time
import zipfile

import numpy as np

from cnnx import architectures, optim, report

SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15}
BUNDLED = ("faces", "fashion-mnist")
# what `cnnx train` writes into its folder (data/ is a cache of a bundled set, kept)
RUN_FILES = ("run.json", "model.npz", "architecture.json", "history.csv", "curves.png",
             "confusion.png", "report.md")
CHECKPOINTS = "checkpoints"
WORKER_TIMEOUT = 60.0                          # s to wait for a remote scheduler's workers
ZIP_SIGNATURE = b"PK\x03\x04"                 # an .npz is a zip archive


class UserError(Exception):
    """A problem the user can fix (the CLI prints it as one line)."""


def _quiet_dask_logging():
    logging.getLogger("distributed").setLevel(logging.ERROR)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what can be resumed."""


# ------------------------------------------------------------------------------- data

def open_data(name_or_store, data_folder):
    """A cnnx.data Dataset: a bundled set is written once into `data_folder`, a store opened."""
    from cnnx import data

    if name_or_store in BUNDLED:
        store = os.path.join(data_folder, f"{name_or_store}.zarr")
        try:
            return data.open_dataset(store)
        except (FileNotFoundError, ValueError):     # not written yet, or left incomplete
            pass
        arrays = (data.load_faces() if name_or_store == "faces"
                  else data.load_fashion_mnist(subset="all"))
        os.makedirs(data_folder, exist_ok=True)
        # at least ~16 chunks, so that every virtual shard owns some of them
        chunk_size = int(np.clip(len(arrays.labels) // 16, 8, 1024))
        data.ingest_arrays(arrays.images, arrays.labels, store, class_names=arrays.class_names,
                           source=name_or_store, chunk_size=chunk_size, overwrite=True)
        return data.open_dataset(store)
    if "://" not in name_or_store and not os.path.exists(name_or_store):
        raise UserError(f"no Zarr store at {name_or_store!r}; make one with `cnnx ingest` or "
                        f"`cnnx synth`, or use --data faces / fashion-mnist")
    return data.open_dataset(name_or_store)


def split_indices(dataset, fractions):
    """(train, val, test) index arrays; `fractions` holds train, val, test and seed."""
    return dataset.split(fractions["train"], fractions["val"], fractions["test"],
                         seed=fractions["seed"])


def read_normalized(dataset, indices, mode, mean, std, batch=4096):
    """(float32 images, labels) of `indices`, normalised with the *training* statistics."""
    from cnnx import data

    parts, labels = [], []
    for begin in range(0, len(indices), batch):
        images, y = dataset.read(indices[begin : begin + batch])
        parts.append(data.normalize(images, mode, mean=mean, std=std))
        labels.append(y)
    return np.concatenate(parts), np.concatenate(labels)


# ------------------------------------------------------------------------------ model

def check_architecture(arch):
    """Refuse a name that is neither a known architecture nor an existing file, early."""
    if arch is None or arch in architectures.ARCHITECTURES or os.path.exists(arch):
        return
    known = ", ".join(sorted(architectures.ARCHITECTURES))
    raise UserError(f"unknown architecture {arch!r}: use {known}, or the path of a "
                    f"model .npz or architecture .json file")


def make_model(arch, image_shape, n_classes, seed):
    """A fresh model: a named architecture, or the architecture of a .npz/.json file."""
    from cnnx import nn

    arch = arch or architectures.default_for(image_shape)
    check_architecture(arch)
    if arch in architectures.ARCHITECTURES:
        return architectures.build(arch, image_shape, n_classes, seed)
    if arch.endswith(".json"):
        with open(arch) as f:
            model = nn.model_from_config(json.load(f))
    else:
        model = load_cnnx_model(arch)
    if tuple(model.input_shape) != tuple(image_shape):
        raise UserError(f"architecture {arch!r} takes images of {tuple(model.input_shape)}, "
                        f"the data has {tuple(image_shape)}")
    return model


def load_cnnx_model(path):
    """nn.load_model, with one clear line naming the file for anything cnnx cannot load."""
    from cnnx import nn

    if not os.path.exists(path):
        raise UserError(f"no model file at {path!r}")
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a folder, not a model file; give the model.npz in it")
    with open(path, "rb") as f:
        head = f.read(len(ZIP_SIGNATURE))
    if head != ZIP_SIGNATURE:
        raise UserError(f"{path!r} is not a model file cnnx wrote (not an .npz archive); "
                        f"give the model.npz of a `cnnx train` run")
    if not zipfile.is_zipfile(path):      # the archive's directory, at its end, is missing
        raise UserError(f"{path!r} is truncated or damaged (an .npz archive without its "
                        f"end); train again or copy the file again")
    try:
        return nn.load_model(path)
    except nn.ArchiveError as error:       # every other damage or mismatch the loader finds
        raise UserError(f"{path!r} is not a model saved by cnnx ({error.reason})") from None


# -------------------------------------------------------------------------------- run

def default_out():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("cnnx-runs", stamp)


def checkpoint_dir(out):
    return os.path.join(out, CHECKPOINTS)


def has_checkpoint(out):
    from cnnx.parallel import checkpoint

    return os.path.exists(checkpoint.checkpoint_path(checkpoint_dir(out)))


def claim_run_folder(out, resume=False, overwrite=False):
    """Refuse to train over the run in `out` unless resumed or replaced (--overwrite clears it)."""
    finished = os.path.exists(os.path.join(out, "model.npz"))
    if resume or not (finished or has_checkpoint(out)):
        return
    if not overwrite:
        state = "a finished run" if finished else "an interrupted run (a checkpoint)"
        raise UserError(f"{out!r} already holds {state}; --resume continues it, --overwrite "
                        f"replaces it, or choose another --out")
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, name))
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


def training_split_problem(n_train, n_images, batch_size):
    """Why no shard count fits: the training split is smaller than one batch (or None)."""
    if n_train >= batch_size:
        return None
    return (f"the training split holds {n_train} of the {n_images} images "
            f"({SPLIT['train']:.0%}), fewer than one batch of --batch-size {batch_size}; "
            f"use --batch-size {max(1, n_train)} or less, or more images")


def shards_problem(indices, chunk_size, batch_size, shards):
    """Why `shards` virtual shards cannot fill a step of `batch_size` (or None)."""
    from cnnx.parallel import plan

    per_shard = batch_size // shards
    smallest = min(len(owned) for owned in plan.shard_indices(indices, chunk_size, shards))
    if smallest >= per_shard:
        return None
    return (f"--shards {shards} leaves one shard {smallest} of the {len(indices)} training "
            f"images (whole chunks of {chunk_size} images go to each shard), fewer than its "
            f"{per_shard} per step (--batch-size {batch_size} / --shards {shards}); use fewer "
            f"--shards or a smaller --batch-size (or `cnnx ingest --chunk-size` smaller)")


def fitting_shards(indices, chunk_size, batch_size, most):
    """The most virtual shards, up to `most`, that divide the batch and all fill a step."""
    for shards in range(max(1, most), 0, -1):
        if batch_size % shards == 0 and not shards_problem(indices, chunk_size, batch_size,
                                                           shards):
            return shards
    return 1     # one shard holds the whole split: training_split_problem has said it fits


def _first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (None if it all exists):
    for the default out, cnnx-runs/ itself on a first run."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


@contextlib.contextmanager
def ctrl_c_for_the_driver_only():
    """Start processes that ignore Ctrl-C; the driver still gets it, once they are started.

    A terminal sends Ctrl-C to the whole process group: Dask's worker processes, started
    from here, would each die with pages of tracebacks (during start-up, "Nanny failed to
    start"). An ignored signal stays ignored across exec (Python then installs no
    KeyboardInterrupt handler, nor does asyncio), so processes started in this block never
    see it; the driver closes them. The driver's main thread blocks SIGINT meanwhile, so a
    Ctrl-C pressed during the start stays pending (Linux never discards a blocked signal)
    and interrupts the driver once the handler is back, unless another thread of the
    driver (zarr's I/O threads, started by opening the data) took it while it was ignored:
    then it is lost, and the next Ctrl-C stops the run. (A worker that a nanny restarts
    later sees Ctrl-C again.)"""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not \
            threading.main_thread():                # Windows, or not the main thread
        yield
        return
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


class TrainingRun:
    """One dataset, one cluster and one output folder; trains one model or a grid of them.

    Everything the user can get wrong (architecture, optimizer, data, batch sizes against
    the data) is checked before the cluster starts. A run that fails before its first
    checkpoint removes the folder it created (closing it with `with`)."""

    def __init__(self, data, out, arch=None, scheduler=None, workers=None, mode="sync",
                 shards=None, optimizer="adam", augment=(), normalize="standardize",
                 wire="float32", seed=0, batch_sizes=(), progress=True, echo=print):
        self.out, self.arch, self.mode, self.shards = out, arch, mode, shards
        self.optimizer_name, self.augment_kinds = optimizer, tuple(augment or ())
        self.normalize, self.wire, self.seed = normalize, wire, seed
        self.progress, self.echo = progress, echo
        self.client = self._cluster = None
        check_architecture(arch)                  # refuse typos before anything starts
        optim.get(optimizer)
        self._made_folder = _first_missing_folder(out)       # removed if this run fails
        os.makedirs(out, exist_ok=True)
        try:
            self.dataset = open_data(data, os.path.join(out, "data"))
            self.data_name = data
            self.split = dict(SPLIT, seed=seed)
            self.train_idx, self.val_idx, self.test_idx = split_indices(self.dataset,
                                                                        self.split)
            for batch_size in batch_sizes:
                self._check_batch_fits(batch_size)
            self.timings = {}
            started = time.perf_counter()
            from cnnx.parallel import cluster

            with ctrl_c_for_the_driver_only():
                self.client, self._cluster = cluster.connect(scheduler, n_workers=workers,
                                                             echo=echo)
            self.timings["cluster start (s)"] = time.perf_counter() - started
        except BaseException:
            self.close(failed=True)
            raise
        self.model = None
        self.history = []

    @classmethod
    def from_args(cls, args, batch_sizes=()):
        return cls(data=args.data, out=args.out or default_out(), arch=args.arch,
                   scheduler=args.scheduler, workers=args.workers, mode=args.mode,
                   shards=args.shards, optimizer=args.optimizer, augment=args.augment,
                   normalize=args.normalize, wire=args.wire, seed=args.seed,
                   batch_sizes=batch_sizes, progress=not args.quiet)

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        self.close(failed=error_type is not None)

    def close(self, failed=False):
        """Close the cluster; after a failure, remove the folder this run created unless
        it holds a checkpoint to resume."""
        if failed and self._cluster is not None and self.client is not None:
            # our own cluster, torn down mid-step: the workers' notes about the tasks the
            # teardown cancels are noise to someone who pressed Ctrl-C or read our error
            with contextlib.suppress(Exception):
                self.client.run(_quiet_dask_logging)
        if self.client is not None:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.client = self._cluster = None
        if failed and self._made_folder and not has_checkpoint(self.out):
            shutil.rmtree(self._made_folder, ignore_errors=True)

    def resume_hint(self, out_given=True):
        """What the user can do after Ctrl-C: resume from the checkpoint, when there is one."""
        if not has_checkpoint(self.out):
            return "no checkpoint was written yet, so there is nothing to resume"
        how = "--resume" if out_given else f"--out {self.out} --resume"
        return (f"the last checkpoint is in {checkpoint_dir(self.out)}; run the same command "
                f"with {how} to continue from it")

    def _check_batch_fits(self, batch_size):
        """Refuse a batch size the training split (or the --shards given) cannot fill."""
        problem = training_split_problem(len(self.train_idx), len(self.dataset), batch_size)
        if problem is None and self.shards:
            problem = shards_problem(self.train_idx, self.dataset.chunk_size, batch_size,
                                     self.shards)
        if problem:
            raise UserError(problem)

    def _shards_for(self, batch_size):
        """--shards when given; else as many as there are workers, fewer if the data is small."""
        from cnnx.parallel import cluster

        if self.shards:
            return self.shards
        workers = cluster.wait_for_workers(self.client, WORKER_TIMEOUT, self.echo)
        return fitting_shards(self.train_idx, self.dataset.chunk_size, batch_size, len(workers))

    def _augmenter(self):
        if not self.augment_kinds:
            return None
        from cnnx import data

        return data.Augment.from_names(self.augment_kinds)

    def _trainer(self, model, shards):
        from cnnx.parallel import DaskTrainer

        return DaskTrainer(model, self.client, mode=self.mode, shards=shards,
                           seed=self.seed, wire_dtype=self.wire, normalize=self.normalize,
                           augment=self._augmenter(), progress=self.progress, echo=self.echo)

    def _compiled_model(self, learning_rate):
        model = make_model(self.arch, self.dataset.image_shape, len(self.dataset.class_names),
                           self.seed)
        model.compile(optim.get(self.optimizer_name, learning_rate=learning_rate),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def train(self, epochs, batch_size, lr, resume=False):
        """Train one model on the train split, validating on the validation split."""
        self._check_batch_fits(batch_size)
        self.model = self._compiled_model(lr)
        shards = self._shards_for(batch_size)
        self.settings = {"data": self.data_name, "store": str(self.dataset.store),
                         "images": len(self.dataset), "image shape": self.dataset.image_shape,
                         "classes": list(self.dataset.class_names),
                         "architecture": self.arch or architectures.default_for(
                             self.dataset.image_shape),
                         "parameters": self.model.count_params(), "mode": self.mode,
                         "shards": shards, "optimizer": self.optimizer_name,
                         "learning rate": lr, "epochs": epochs, "batch size": batch_size,
                         "normalize": self.normalize, "augment": list(self.augment_kinds),
                         "wire format": self.wire, "seed": self.seed,
                         "workers": len(self.client.scheduler_info(n_workers=-1)["workers"])}
        self.model.summary(print_fn=self.echo)
        self._write_run_json()
        started = time.perf_counter()
        trainer = self._trainer(self.model, shards)
        self.history = trainer.fit(self.dataset, epochs=epochs, batch_size=batch_size,
                                   indices=self.train_idx, validation=self.val_idx,
                                   checkpoint_dir=checkpoint_dir(self.out), resume=resume)
        self.timings["training (s)"] = time.perf_counter() - started
        return self.history

    def finish(self):
        """Test metrics and every file of the run folder; prints where they are."""
        self.model.save(os.path.join(self.out, "model.npz"))
        with open(os.path.join(self.out, "architecture.json"), "w") as f:
            json.dump(self.model.get_config(), f, indent=2)
        write_history_csv(self.history, os.path.join(self.out, "history.csv"))
        report.plot_history(_curves(self.history), os.path.join(self.out, "curves.png"),
                            title=f"cnnx {self.settings['architecture']} on {self.data_name}")
        result = evaluate_arrays(self.model, self.dataset, self.test_idx, self.normalize,
                                 self.dataset.mean, self.dataset.std)
        report.plot_confusion(result.counts, result.class_names,
                              os.path.join(self.out, "confusion.png"))
        with open(os.path.join(self.out, "report.md"), "w") as f:
            f.write(self._report_markdown(result))
        self.echo(result.text())
        self.echo(f"cnnx: test accuracy {result.accuracy:.4f}; files in {self.out}/")
        return result

    def _write_run_json(self):
        info = {"data": self.data_name, "store": _resolved(str(self.dataset.store)),
                "image_shape": list(self.dataset.image_shape),
                "class_names": list(self.dataset.class_names), "normalize": self.normalize,
                "mean": np.asarray(self.dataset.mean).tolist(),
                "std": np.asarray(self.dataset.std).tolist(),
                "split": self.split}
        with open(os.path.join(self.out, "run.json"), "w") as f:
            json.dump(info, f, indent=2)

    def _report_markdown(self, result):
        last = self.history[-1] if self.history else {}
        steps = sum(h.get("steps", 0) for h in self.history) or 1
        moved = sum(h.get("bytes_out", 0) + h.get("bytes_in", 0)
                    + h.get("bytes_between_workers", 0) for h in self.history)
        images_per_s = [h["images_per_s"] for h in self.history if "images_per_s" in h]
        throughput = {
            "images/s (median over epochs)": float(np.median(images_per_s)) if images_per_s
            else 0.0,
            "MB moved per step (driver in + out + between workers)": moved / steps / 1e6,
            "steps": steps,
        }
        machine = {"host": platform.node(), "cores": os.cpu_count(),
                   "python": platform.python_version()}
        sections = [
            f"# cnnx run {os.path.basename(os.path.abspath(self.out))}", "",
            "## Configuration", "", _key_values(self.settings), "",
            "## Timings", "", _key_values({**self.timings, **machine}), "",
            "## Throughput and traffic", "", _key_values(throughput), "",
            "## Final metrics", "",
            _key_values({"train loss": last.get("loss"), "train accuracy": last.get("accuracy"),
                         "validation loss": last.get("val_loss"),
                         "validation accuracy": last.get("val_accuracy"),
                         "test loss": result.loss, "test accuracy": result.accuracy}), "",
            "## Per class (test set)", "", result.per_class_table(), "",
            "![training curves](curves.png)", "", "![confusion matrix](confusion.png)", "",
        ]
        return "\n".join(sections)

    def grid(self, learning_rates, batch_sizes, epochs):
        """The papers' learning rate x batch size table, every cell on this cluster."""
        rows = []
        for lr in learning_rates:
            for batch_size in batch_sizes:
                self.echo(f"cnnx: grid cell lr={lr:g}, batch={batch_size}")
                model = self._compiled_model(lr)
                trainer = self._trainer(model, self._shards_for(batch_size))
                trainer.fit(self.dataset, epochs=epochs, batch_size=batch_size,
                            indices=self.train_idx)
                train = trainer.evaluate(self.train_idx)
                test = trainer.evaluate(self.test_idx)
                rows.append((lr, batch_size, train["loss"], train["accuracy"], test["loss"],
                             test["accuracy"]))
        headers = ["lr", "batch", "train loss", "train accuracy", "test loss", "test accuracy"]
        table = report.format_table(headers, rows)
        with open(os.path.join(self.out, "grid.md"), "w") as f:
            f.write(f"# Learning rate x batch size ({self.data_name}, {epochs} epochs)\n\n"
                    f"{table}\n")
        with open(os.path.join(self.out, "grid.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(headers)
            writer.writerows(rows)
        return table


def _key_values(mapping):
    return report.format_table(["", "value"], [(k, "-" if v is None else v)
                                               for k, v in mapping.items()])


def _curves(history):
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    return {k: [h[k] for h in history if k in h] for k in keys}


def write_history_csv(history, path):
    columns = sorted({k for h in history for k, v in h.items() if np.isscalar(v)},
                     key=lambda k: (k != "epoch", k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


# ------------------------------------------------------------------ evaluate / predict

class Evaluation:
    def __init__(self, loss, counts, class_names):
        self.loss, self.counts, self.class_names = loss, counts, list(class_names)
        self.accuracy = float(np.trace(counts) / max(counts.sum(), 1))

    def per_class_table(self):
        rows = report.per_class_report(self.counts, self.class_names)
        return report.format_table(["class", "precision", "recall", "f1", "support"], rows)

    def text(self):
        confusion = report.format_table(
            ["true \\ predicted", *self.class_names],
            [(name, *map(int, row)) for name, row in zip(self.class_names, self.counts)])
        return (f"loss {self.loss:.4f}, accuracy {self.accuracy:.4f} on "
                f"{int(self.counts.sum())} images\n\n{self.per_class_table()}\n\n{confusion}")


def evaluate_arrays(model, dataset, indices, normalize, mean, std):
    x, y = read_normalized(dataset, np.asarray(indices), normalize, mean, std)
    probabilities = model.predict(x)              # one forward pass gives loss and classes
    loss = model.loss(probabilities, y)[0] / len(y) + model.regularization_loss()
    counts = report.confusion_matrix(y, probabilities.argmax(axis=1), len(dataset.class_names))
    return Evaluation(loss, counts, dataset.class_names)


def _run_info(model_path):
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "run.json")
    if not os.path.exists(path):
        raise UserError(f"no run.json beside {model_path!r}: cnnx needs the run folder that "
                        f"`cnnx train` wrote (it holds the normalisation and the classes)")
    with open(path) as f:
        return json.load(f)


def _resolved(store):
    """A store named the same way whatever the working folder: local paths made absolute."""
    return store if "://" in store else os.path.realpath(store)


def _is_runs_store(dataset, data_name, info):
    """True when `dataset` is the store the run was trained on, so its test split applies."""
    if data_name in BUNDLED:          # a bundled set is written into each run folder
        return info.get("data") == data_name
    # run.json of older runs holds the path as given, relative to where training ran
    return _resolved(str(dataset.store)) == _resolved(info["store"])


def _check_classes(model, model_path, dataset, data_name, info):
    """The store's classes must be the ones the model was trained on, in the same order."""
    trained = list(info["class_names"])
    n_outputs = model.output_shape[-1]
    store_classes = list(dataset.class_names)
    if store_classes != trained or n_outputs != len(store_classes):
        raise UserError(f"{model_path!r} tells {n_outputs} classes apart "
                        f"({', '.join(trained)}), {data_name!r} has {len(store_classes)} "
                        f"({', '.join(store_classes)}); evaluate it on data with the classes "
                        f"it was trained on")


def evaluate_model(model_path, data_name, split="test"):
    model = load_cnnx_model(model_path)
    info = _run_info(model_path)
    folder = os.path.dirname(os.path.abspath(model_path))
    dataset = open_data(data_name, os.path.join(folder, "data"))
    if tuple(dataset.image_shape) != tuple(model.input_shape):
        raise UserError(f"the model takes images of {tuple(model.input_shape)}, "
                        f"{data_name!r} has {tuple(dataset.image_shape)}")
    _check_classes(model, model_path, dataset, data_name, info)
    if split == "test":
        if not _is_runs_store(dataset, data_name, info):
            raise UserError(f"the run's test split belongs to {info['store']!r}, not "
                            f"{str(dataset.store)!r}; use --split all to evaluate on every "
                            f"image of another store")
        indices = split_indices(dataset, info["split"])[2]
    else:
        indices = np.arange(len(dataset))
    return evaluate_arrays(model, dataset, indices, info["normalize"],
                           np.asarray(info["mean"]), np.asarray(info["std"]))


def predict_files(model_path, paths):
    """One dict per image, in order: path, class, probability and every class's
    probability; or path and error for a file that cannot be read (the others still are)."""
    from cnnx import data

    model = load_cnnx_model(model_path)
    info = _run_info(model_path)
    height, width, channels = info["image_shape"]
    rows, images = [], []
    for path in paths:
        try:
            images.append(data.load_image(path, (height, width), grayscale=channels == 1))
            rows.append({"path": path})
        except (data.BadImage, OSError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            rows.append({"path": path, "error": f"cannot read image: {reason}"})
    if not images:
        return rows
    x = data.normalize(np.stack(images), info["normalize"], mean=np.asarray(info["mean"]),
                       std=np.asarray(info["std"]))
    probabilities = iter(model.predict(x))
    names = info["class_names"]
    for row in rows:
        if "error" not in row:
            p = next(probabilities)
            row.update({"class": names[int(p.argmax())], "probability": float(p.max()),
                        "probabilities": dict(zip(names, map(float, p)))})
    return rows
