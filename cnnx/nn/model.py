"""Sequential: a stack of layers built eagerly, trained with compile / fit like Keras.

fit is a loop over gradient() and apply_gradients(), the same two calls a distributed
driver makes, so summing shard gradients and applying them reproduces fit.
"""
import math
import os
import time

import numpy as np

from cnnx import optim
from cnnx.nn import archive
from cnnx.nn import callbacks as callbacks_module
from cnnx.nn import losses
from cnnx.nn.gradient_sum import GradientSum
from cnnx.nn.layer import ActivatedLayer, Layer
from cnnx.nn.lazy_rng import LazyRng
from cnnx.nn.normalization import fuse_batchnorm_relu
from cnnx.nn.pooling import fuse_relu_into_max_pool
from cnnx.nn.summary import summary_table

# Keras' default layer names (Keras numbers repeats: conv2d, conv2d_1, ...)
_KERAS_NAMES = {"Conv2D": "conv2d", "MaxPool2D": "max_pooling2d", "AvgPool2D": "average_pooling2d",
                "BatchNormalization": "batch_normalization", "ReLU": "re_lu",
                "LeakyReLU": "leaky_re_lu"}

# Separate random streams of one seed: (seed, _INIT, layer index), (seed, _SHUFFLE, epoch);
# dropout draws from (seed, epoch, step, shard), a 4-tuple, so it never meets these.
_INIT, _SHUFFLE = 0, 1

_FLOAT32 = np.dtype(np.float32)

# The kernels index arrays with 32-bit ints (cnnx/_kernels.pyx refuses anything larger), so a
# sample (one image, one layer output) can hold at most this many values.
MAX_SAMPLE_SIZE = 2**31 - 1


class NonFiniteLossError(FloatingPointError):
    """fit stopped because the loss became NaN or inf; `epoch` and `step` say where (0-based)."""

    def __init__(self, message, epoch, step):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class Sequential:
    """layers applied in order to inputs of shape (N, *input_shape); float32 throughout."""

    def __init__(self, layers, input_shape, seed=0, name="sequential"):
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential expects cnnx.nn layers, got {type(layer).__name__}")
        self.layers = list(layers)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.seed = int(seed)
        self.name = name
        self.optimizer = self.loss = None
        self.metrics = []
        self.stop_training = False
        self._build()

    def _build(self):
        counts, shape = {}, self.input_shape
        self._check_sample_size(shape, "its input_shape")
        for index, layer in enumerate(self.layers):
            if layer.name is None:
                base = _KERAS_NAMES.get(type(layer).__name__, type(layer).__name__.lower())
                count = counts.get(base, 0)
                layer.name = base if count == 0 else f"{base}_{count}"
                counts[base] = count + 1
            layer.input_shape = shape
            layer.output_shape = tuple(layer.build(shape, np.random.default_rng(
                (self.seed, _INIT, index))))
            shape = layer.output_shape
            self._check_sample_size(shape, f"layer {layer.name!r} ({type(layer).__name__})")
        names = [layer.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Sequential: layer names must be unique, got {duplicates} twice")
        self.layers[0].need_input_grad = False      # nobody needs the image gradient
        fuse_batchnorm_relu(self.layers)            # same bits, two passes fewer per pair
        fuse_relu_into_max_pool(self.layers)        # same bits, one pass fewer per pair
        self.output_shape = shape

    def _check_sample_size(self, shape, who):
        # before the next layer builds: a Dense after a 2**40-value Flatten must not allocate
        if any(d < 1 for d in shape):
            raise ValueError(f"{self.name}: {who} has shape {(None, *shape)}; every "
                             f"dimension must be at least 1")
        size = math.prod(shape)                       # a Python int: no int64 overflow
        if size > MAX_SAMPLE_SIZE:
            raise ValueError(f"{self.name}: {who} has shape {(None, *shape)}, {size} values "
                             f"per sample; the kernels take at most 2**31 - 1 "
                             f"({MAX_SAMPLE_SIZE}); use smaller images or more pooling")

    # ------------------------------------------------------------------ flat parameter dicts

    def _flat(self, attribute):
        return {f"{layer.name}/{key}": value for layer in self.layers
                for key, value in getattr(layer, attribute).items()}

    @property
    def params(self):
        """{"layer/param": array}, the layers' own arrays (an optimizer updates them in place)."""
        return self._flat("params")

    @property
    def grads(self):
        return self._flat("grads")

    @property
    def state(self):
        return self._flat("state")

    def get_weights(self):
        """Copies of params and state, keyed "layer/param"."""
        return {key: value.copy() for key, value in {**self.params, **self.state}.items()}

    def set_weights(self, weights):
        """Copy weights (a dict like get_weights') into the model's own arrays."""
        own = {**self.params, **self.state}
        if set(weights) != set(own):
            raise ValueError(f"{self.name}.set_weights: missing {sorted(set(own) - set(weights))},"
                             f" unexpected {sorted(set(weights) - set(own))}")
        for key, value in weights.items():
            if np.shape(value) != own[key].shape:
                raise ValueError(f"{self.name}.set_weights: {key!r} expected shape "
                                 f"{own[key].shape}, got {np.shape(value)}")
        for key, value in weights.items():
            np.copyto(own[key], value, casting="same_kind")

    def count_params(self):
        """All weights, trainable and not (BatchNorm's moving statistics), as Keras counts."""
        return sum(value.size for value in {**self.params, **self.state}.values())

    # ------------------------------------------------------------------------- compile

    def compile(self, optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None):
        self.optimizer = optim.get(optimizer)
        self.loss = losses.get(loss)
        for metric in metrics or []:
            if metric not in ("accuracy", "acc"):
                raise ValueError(f"{self.name}.compile: only the 'accuracy' metric is "
                                 f"supported, got {metric!r}")
        self.metrics = ["accuracy"] if metrics else []
        last = self.layers[-1]
        # softmax + cross-entropy (sigmoid + binary): loss from the logits, gradient p - y
        self._fused = (isinstance(last, ActivatedLayer)
                       and isinstance(last.activation, self.loss.fuses_with))

    def _require_compiled(self, who):
        if self.loss is None:
            raise RuntimeError(f"{self.name}.{who}: call compile(optimizer, loss) first")

    # ------------------------------------------------------------------- one training step

    def forward(self, x, training=False, rng=None):
        self.layers[0].check_input(x)
        for layer in self.layers:
            x = layer.forward(x, training, rng)
        return x

    def gradient(self, x, y, key=(0, 0, 0)):
        """One forward and backward in training mode on a batch -> GradientSum.

        Dropout draws from np.random.default_rng((seed, *key)).  The model's BatchNorm
        moving statistics are left as they were; the updated ones come back in
        GradientSum.state (apply_gradients(grads, state) installs them).
        """
        self._require_compiled("gradient")
        x = self._as_input(x, "gradient")
        y = self._as_labels(y, len(x), "gradient")
        state = self.state
        state_before = {name: value.copy() for name, value in state.items()}
        rng = LazyRng((self.seed, *key))
        outputs = x                       # _as_input checked the first layer's input shape
        for layer in self.layers:
            outputs = layer.forward(outputs, True, rng)
        last = self.layers[-1]
        if self._fused:
            loss_sum, grad = self.loss.from_logits(last.logits(), y)
        else:
            loss_sum, grad = self.loss(outputs, y)
        # counted next to the loss, while NumPy's code is still in the caches (after the
        # backward's kernels have pushed it out, the same count cost four times as much)
        n_correct = self.loss.n_correct(outputs, y)
        grad = last.backward_logits(grad) if self._fused else last.backward(grad)
        for layer in reversed(self.layers[:-1]):
            grad = layer.backward(grad)
        result = GradientSum(grads=self.grads, n_samples=len(x), loss_sum=loss_sum,
                             n_correct=n_correct, state={})
        if state_before:
            state_after = self.state
            result.state = {name: value.copy() for name, value in state_after.items()}
            for name, value in state_before.items():
                state_after[name][...] = value
        return result

    def regularization_loss(self):
        return sum(regularizer(layer.params[name]) for layer in self.layers
                   for name, regularizer in layer.regularizers.items())

    def regularization_gradient(self):
        """{"layer/param": d penalty / d param} for the params that have a regularizer."""
        return {f"{layer.name}/{name}": regularizer.gradient(layer.params[name])
                for layer in self.layers for name, regularizer in layer.regularizers.items()}

    def _regularizers(self):
        return {f"{layer.name}/{name}": regularizer for layer in self.layers
                for name, regularizer in layer.regularizers.items()}

    def apply_gradients(self, grads, state=None):
        """grads: MEAN gradients of the loss ({"layer/param": array}, i.e. GradientSum.grads
        / n_samples).  Adds the regularizer gradient and takes one optimizer step; installs
        `state` (GradientSum.state) as the new BatchNorm statistics when given."""
        self._step(grads, 1, state)

    def apply_gradient_sum(self, total):
        """One optimizer step from a GradientSum (one batch's, or the sum of shards'):
        its mean gradients, and its BatchNorm statistics installed."""
        self._step(total.grads, total.n_samples, total.state)

    def _step(self, grads, n_samples, state):
        # the optimizer reads grads / n_samples + the regularizer's gradient inside its
        # update pass: no mean or penalty arrays (the same bits as making them)
        self._require_compiled("apply_gradients")
        self.optimizer.apply(self.params, grads, n_samples, self._regularizers())
        if state:
            own = self.state
            for key, value in state.items():
                own[key][...] = value

    def train_step(self, x, y, key=(0, 0, 0)):
        """The training step: gradient(x, y, key), then apply_gradient_sum.

        key is (epoch, step, shard).  Returns the batch's GradientSum (loss and counts
        before the update).  A NaN or inf loss raises NonFiniteLossError before any
        weight changes.
        """
        result = self.gradient(x, y, key)
        if not math.isfinite(result.loss_sum):
            epoch, step = key[0], key[1]
            raise NonFiniteLossError(f"{self.name}: the loss became {result.loss_sum} "
                                     f"at epoch {epoch}, step {step}; lower the learning "
                                     f"rate or check the inputs for NaN/inf", epoch, step)
        self.apply_gradient_sum(result)
        return result

    # -------------------------------------------------------------------------- fit

    def fit(self, x, y, batch_size=32, epochs=1, validation_data=None, validation_split=0.0,
            shuffle=True, callbacks=None, verbose=1, initial_epoch=0):
        """Train; returns a History whose history dict holds loss (+ accuracy, val_*) per epoch."""
        self._require_compiled("fit")
        x = self._as_input(x, "fit")
        y = self._as_labels(y, len(x), "fit")
        if validation_data is None and validation_split:
            if not 0 < validation_split < 1:
                raise ValueError(f"{self.name}.fit: validation_split must be in (0, 1), "
                                 f"got {validation_split}")
            cut = len(x) - int(round(len(x) * validation_split))   # the last samples, as Keras
            x, y, validation_data = x[:cut], y[:cut], (x[cut:], y[cut:])
        if len(x) == 0:
            raise ValueError(f"{self.name}.fit: no training samples")
        for name, value in (("batch_size", batch_size), ("epochs", epochs)):
            self._check_positive(name, value, "fit")
        steps = -(-len(x) // batch_size)
        history = callbacks_module.History()
        every = [history, *(callbacks or [])]
        if verbose:
            every.append(callbacks_module.ProgressBar())
        for callback in every:
            callback.set_model(self)
            callback.set_params({"epochs": epochs, "steps": steps, "verbose": verbose})
            callback.on_train_begin()
        self.stop_training = False
        try:
            for epoch in range(initial_epoch, epochs):
                for callback in every:
                    callback.on_epoch_begin(epoch)
                logs = self._train_epoch(x, y, batch_size, epoch, shuffle, every)
                if validation_data is not None:
                    values = self.evaluate(*validation_data, return_dict=True)
                    logs.update({f"val_{k}": v for k, v in values.items()})
                for callback in every:
                    callback.on_epoch_end(epoch, logs)
                if self.stop_training:
                    break
        finally:        # also on NaN loss or Ctrl-C: close log files and progress bars
            for callback in every:
                callback.on_train_end()
        return history

    def _train_epoch(self, x, y, batch_size, epoch, shuffle, callbacks):
        n = len(x)
        order = (np.random.default_rng((self.seed, _SHUFFLE, epoch)).permutation(n)
                 if shuffle else np.arange(n))
        loss_sum, n_correct, seen, start = 0.0, 0, 0, time.perf_counter()
        for step, begin in enumerate(range(0, n, batch_size)):
            index = order[begin : begin + batch_size]
            result = self.train_step(x[index], y[index], key=(epoch, step, 0))
            loss_sum, n_correct, seen = (loss_sum + result.loss_sum,
                                         n_correct + result.n_correct, seen + result.n_samples)
            logs = self._logs(loss_sum, n_correct, seen)
            logs["loss"] += self.regularization_loss()     # as the epoch's loss has it
            logs["images/s"] = seen / max(time.perf_counter() - start, 1e-9)
            for callback in callbacks:
                callback.on_train_batch_end(step, logs)
        logs = self._logs(loss_sum, n_correct, seen)
        logs["loss"] += self.regularization_loss()
        return logs

    def _logs(self, loss_sum, n_correct, n):
        logs = {"loss": loss_sum / n}
        if self.metrics:
            logs["accuracy"] = n_correct / n
        return logs

    # --------------------------------------------------------------------- inference

    def predict(self, x, batch_size=256, verbose=0):
        """Outputs in inference mode (moving BatchNorm statistics, no dropout)."""
        self._check_positive("batch_size", batch_size, "predict")
        x = self._as_input(x, "predict")
        return np.concatenate([self.forward(x[i : i + batch_size])
                               for i in range(0, len(x), batch_size)])

    def evaluate(self, x, y, batch_size=256, verbose=0, return_dict=False):
        """[loss, accuracy] (or the loss alone without metrics), loss including regularization."""
        self._require_compiled("evaluate")
        self._check_positive("batch_size", batch_size, "evaluate")
        x = self._as_input(x, "evaluate")
        y = self._as_labels(y, len(x), "evaluate")
        loss_sum, n_correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            outputs = self.forward(x[i : i + batch_size])
            loss_sum += self.loss(outputs, y[i : i + batch_size])[0]
            n_correct += self.loss.n_correct(outputs, y[i : i + batch_size])
        logs = self._logs(loss_sum, n_correct, len(x))
        logs["loss"] += self.regularization_loss()
        if return_dict:
            return logs
        return [logs["loss"], logs["accuracy"]] if self.metrics else logs["loss"]

    # -------------------------------------------------------------- inputs at the edge

    def _as_input(self, x, who):
        """float32, C-contiguous, shape (N, *input_shape): converted once, here (a step's
        batch usually is already: then no NumPy call at all)."""
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            first = self.layers[0]
            raise ValueError(f"{self.name}.{who}: layer {first.name!r} "
                             f"({type(first).__name__}) expected input "
                             f"{(None, *self.input_shape)}, got {x.shape}")
        if len(x) == 0:
            raise ValueError(f"{self.name}.{who}: got no samples (x has shape {x.shape})")
        if x.dtype == _FLOAT32 and x.flags.c_contiguous:
            return x
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_positive(self, name, value, who):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{self.name}.{who}: {name} must be a positive integer, "
                             f"got {value!r}")

    def _as_labels(self, y, n, who):
        if type(y) is not np.ndarray:
            y = np.asarray(y)
        if y.ndim == 0 or len(y) != n:
            raise ValueError(f"{self.name}.{who}: x has {n} samples but y has "
                             f"{len(y) if y.ndim else 'a single value'}")
        return self.loss.check_labels(y, self.output_shape[-1], f"{self.name}.{who}")

    # ----------------------------------------------------------------- summary, saving

    def summary(self, print_fn=print):
        """A Keras-style table of layers, output shapes and parameter counts; also returned."""
        text = summary_table(self)
        if print_fn is not None:
            print_fn(text)
        return text

    def get_config(self):
        return {"name": self.name, "input_shape": list(self.input_shape), "seed": self.seed,
                "layers": [{"class_name": type(layer).__name__, "config": layer.get_config()}
                           for layer in self.layers]}

    def save(self, path, include_optimizer=True):
        """Write the architecture, weights and (if compiled) optimizer to `path` (".npz"
        appended if missing, as numpy does), atomically; nn.load_model reads it back.
        Returns the path written."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        documents, optimizer_state = {"architecture": self.get_config()}, {}
        if include_optimizer and self.optimizer is not None:
            documents["compile"] = {"optimizer": self.optimizer.get_config(),
                                    "loss": self.loss.get_config(), "metrics": self.metrics}
            optimizer_state = self.optimizer.state_dict()
        return archive.write_archive(path, {**self.params, **self.state}, optimizer_state,
                                     documents)
