"""Callbacks for Sequential.fit, with Keras' hook names: History, EarlyStopping, CSVLogger,
ModelCheckpoint and the tqdm progress bar."""
import csv
import math
import warnings

from tqdm.auto import tqdm


class Callback:
    """Hooks fit calls; `model` and `params` ({"epochs", "steps", "verbose"}) are set first."""
    model = None
    params = None

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


class History(Callback):
    """history["loss"][i] is epoch i's value, as in Keras; fit returns it."""

    def __init__(self):
        self.epoch, self.history = [], {}

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)


def _better(mode, monitor):
    """The comparison that means "improved" for a monitored quantity."""
    if mode == "auto":
        mode = "max" if "acc" in monitor else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    return (lambda new, best, delta: new < best - delta) if mode == "min" else \
           (lambda new, best, delta: new > best + delta), (math.inf if mode == "min" else -math.inf)


def _monitored(logs, monitor, who):
    value = (logs or {}).get(monitor)
    if value is None:
        warnings.warn(f"{who}: {monitor!r} is not among the logged metrics "
                      f"{sorted(logs or {})}; nothing monitored this epoch", stacklevel=3)
    return value


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs."""

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, mode="auto",
                 restore_best_weights=False):
        self.monitor, self.min_delta, self.patience = monitor, abs(min_delta), patience
        self.improved, self._start = _better(mode, monitor)
        self.restore_best_weights = restore_best_weights

    def on_train_begin(self, logs=None):
        self.wait, self.best, self.best_weights = 0, self._start, None
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        value = _monitored(logs, self.monitor, "EarlyStopping")
        if value is None:
            return
        if self.improved(value, self.best, self.min_delta):
            self.best, self.wait = value, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.wait >= max(self.patience, 1):          # Keras: stop after `patience` bad epochs
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch is not None and self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class CSVLogger(Callback):
    """One row per epoch: epoch, then the logged metrics in sorted order."""

    def __init__(self, filename, separator=",", append=False):
        self.filename, self.separator, self.append = filename, separator, append
        self._file = self._writer = None

    def on_train_begin(self, logs=None):
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._writer is None:
            fields = ["epoch", *sorted(logs)]
            self._writer = csv.DictWriter(self._file, fields, delimiter=self.separator)
            if not self.append or self._file.tell() == 0:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **logs})
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


class ModelCheckpoint(Callback):
    """model.save(filepath.format(epoch=epoch + 1, **logs)) after each epoch, or only when
    `monitor` improved (save_best_only)."""

    def __init__(self, filepath, monitor="val_loss", save_best_only=False, mode="auto"):
        self.filepath, self.monitor, self.save_best_only = str(filepath), monitor, save_best_only
        self.improved, self._start = _better(mode, monitor)

    def on_train_begin(self, logs=None):
        self.best = self._start

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            value = _monitored(logs, self.monitor, "ModelCheckpoint")
            if value is None or not self.improved(value, self.best, 0.0):
                return
            self.best = value
        self.model.save(self.filepath.format(epoch=epoch + 1, **logs))


class ProgressBar(Callback):
    """A tqdm bar per epoch showing the running loss, accuracy and images/s."""

    def on_epoch_begin(self, epoch, logs=None):
        self._bar = tqdm(total=self.params["steps"], unit="batch", leave=True,
                         desc=f"Epoch {epoch + 1}/{self.params['epochs']}")

    def on_train_batch_end(self, batch, logs=None):
        self._speed = (logs or {}).get("images/s")
        self._bar.update(1)
        self._bar.set_postfix(_short(logs), refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        # the epoch's logs (with val_*) plus the training speed, which History does not keep
        self._bar.set_postfix(_short({**(logs or {}), "images/s": self._speed}))
        self._bar.close()


def _short(logs):
    return {key: (f"{value:.0f}" if key == "images/s" else f"{value:.4f}")
            for key, value in (logs or {}).items() if value is not None}
