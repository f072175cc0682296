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
import csv
import datetime
import json
import os
import platform
import time

import numpy as np

from cnnx import architectures, optim, report

SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15}
BUNDLED = ("faces", "fashion-mnist")


class UserError(Exception):
    """A problem the user can fix (the CLI prints it as one line)."""


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
    """nn.load_model, with a clear message for a file cnnx did not write."""
    from cnnx import nn

    if not os.path.exists(path):
        raise UserError(f"no model file at {path!r}")
    try:
        return nn.load_model(path)
    except (KeyError, ValueError, OSError, EOFError) as error:
        raise UserError(f"{path!r} is not a model saved by cnnx ({type(error).__name__}: "
                        f"{error})") from None


# -------------------------------------------------------------------------------- run

def default_out():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("cnnx-runs", stamp)


class TrainingRun:
    """One dataset, one cluster and one output folder; trains one model or a grid of them."""

    def __init__(self, data, out, arch=None, scheduler=None, workers=None, mode="sync",
                 shards=None, optimizer="adam", augment=(), normalize="standardize",
                 wire="float32", seed=0, progress=True, echo=print):
        self.out, self.arch, self.mode, self.shards = out, arch, mode, shards
        self.optimizer_name, self.augment_kinds = optimizer, tuple(augment or ())
        self.normalize, self.wire, self.seed = normalize, wire, seed
        self.progress, self.echo = progress, echo
        check_architecture(arch)                  # refuse typos before anything starts
        optim.get(optimizer)
        os.makedirs(out, exist_ok=True)
        self.dataset = open_data(data, os.path.join(out, "data"))
        self.data_name = data
        self.split = dict(SPLIT, seed=seed)
        self.train_idx, self.val_idx, self.test_idx = split_indices(self.dataset, self.split)
        self.timings = {}
        started = time.perf_counter()
        from cnnx.parallel import cluster

        self.client, self._cluster = cluster.connect(scheduler, n_workers=workers, echo=echo)
        self.timings["cluster start (s)"] = time.perf_counter() - started
        self.model = None
        self.history = []

    @classmethod
    def from_args(cls, args):
        return cls(data=args.data, out=args.out or default_out(), arch=args.arch,
                   scheduler=args.scheduler, workers=args.workers, mode=args.mode,
                   shards=args.shards, optimizer=args.optimizer, augment=args.augment,
                   normalize=args.normalize, wire=args.wire, seed=args.seed,
                   progress=not args.quiet)

    def close(self):
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def _augmenter(self):
        if not self.augment_kinds:
            return None
        from cnnx import data

        return data.Augment.from_names(self.augment_kinds)

    def _trainer(self, model):
        from cnnx.parallel import DaskTrainer

        return DaskTrainer(model, self.client, mode=self.mode, shards=self.shards,
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
        self.model = self._compiled_model(lr)
        self.settings = {"data": self.data_name, "store": str(self.dataset.store),
                         "images": len(self.dataset), "image shape": self.dataset.image_shape,
                         "classes": list(self.dataset.class_names),
                         "architecture": self.arch or architectures.default_for(
                             self.dataset.image_shape),
                         "parameters": self.model.count_params(), "mode": self.mode,
                         "shards": self.shards, "optimizer": self.optimizer_name,
                         "learning rate": lr, "epochs": epochs, "batch size": batch_size,
                         "normalize": self.normalize, "augment": list(self.augment_kinds),
                         "wire format": self.wire, "seed": self.seed,
                         "workers": len(self.client.scheduler_info(n_workers=-1)["workers"])}
        self.model.summary(print_fn=self.echo)
        self._write_run_json()
        started = time.perf_counter()
        trainer = self._trainer(self.model)
        self.history = trainer.fit(self.dataset, epochs=epochs, batch_size=batch_size,
                                   indices=self.train_idx, validation=self.val_idx,
                                   checkpoint_dir=os.path.join(self.out, "checkpoints"),
                                   resume=resume)
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
        info = {"data": self.data_name, "store": str(self.dataset.store),
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
                trainer = self._trainer(model)
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


def evaluate_model(model_path, data_name, split="test"):
    model = load_cnnx_model(model_path)
    info = _run_info(model_path)
    folder = os.path.dirname(os.path.abspath(model_path))
    dataset = open_data(data_name, os.path.join(folder, "data"))
    if tuple(dataset.image_shape) != tuple(model.input_shape):
        raise UserError(f"the model takes images of {tuple(model.input_shape)}, "
                        f"{data_name!r} has {tuple(dataset.image_shape)}")
    if split == "test":
        if str(dataset.store) != info["store"]:
            raise UserError(f"the run's test split belongs to {info['store']!r}, not "
                            f"{str(dataset.store)!r}; use --split all to evaluate on every "
                            f"image of another store")
        indices = split_indices(dataset, info["split"])[2]
    else:
        indices = np.arange(len(dataset))
    return evaluate_arrays(model, dataset, indices, info["normalize"],
                           np.asarray(info["mean"]), np.asarray(info["std"]))


def predict_files(model_path, paths):
    """One dict per image: path, class, probability, and every class's probability."""
    from cnnx import data

    model = load_cnnx_model(model_path)
    info = _run_info(model_path)
    height, width, channels = info["image_shape"]
    images = []
    for path in paths:
        try:
            images.append(data.load_image(path, (height, width), grayscale=channels == 1))
        except (data.BadImage, FileNotFoundError) as error:
            raise UserError(f"cannot read image {path!r}: {error}") from None
    images = np.stack(images)
    x = data.normalize(images, info["normalize"], mean=np.asarray(info["mean"]),
                       std=np.asarray(info["std"]))
    probabilities = model.predict(x)
    names = info["class_names"]
    return [{"path": path, "class": names[int(p.argmax())], "probability": float(p.max()),
             "probabilities": dict(zip(names, map(float, p)))}
            for path, p in zip(paths, probabilities)]
