"""Model files: load_model checks a file against the architecture it names before building
the model, and builds it without drawing initial weights; save_model is Sequential.save.

A model file is an archive (cnnx.nn.archive) holding "architecture" (Sequential.get_config()),
"weights/<layer>/<param>" and, when compiled, "compile" (optimizer, loss, metrics) and
"optimizer/<key>" (Optimizer.state_dict()).
"""
import os

import numpy as np

from cnnx import optim
from cnnx.nn import archive as archive_format
from cnnx.nn import convolution, core, losses, normalization, pooling
from cnnx.nn.archive import OPTIMIZER, WEIGHTS, ArchiveError
from cnnx.nn.model import Sequential

LAYER_CLASSES = {cls.__name__: cls for cls in (
    convolution.Conv2D, core.Dense, core.Flatten, core.Dropout, core.Activation, core.ReLU,
    core.LeakyReLU, core.Softmax, pooling.MaxPool2D, pooling.AvgPool2D,
    normalization.BatchNormalization)}


def model_from_config(config):
    """A freshly initialised Sequential from Sequential.get_config()."""
    return _sequential(config, initializer=None)


def save_model(model, path, include_optimizer=True):
    """model.save(path): ".npz" appended if missing, written atomically; returns the path."""
    return model.save(path, include_optimizer)


def load_model(path, compile=True):
    """The model save_model wrote: same architecture, weights and (if saved and `compile`)
    optimizer state.  FileNotFoundError when there is no file; ArchiveError (a ValueError)
    for anything else wrong with it, raised before the model's weights are allocated."""
    path = os.fspath(path)
    if not os.path.isfile(path) and os.path.isfile(path + ".npz"):
        path += ".npz"                            # save_model appends it, as numpy does
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_model: no model file at {path!r}")
    with archive_format.open_archive(path) as archive:
        archive.check_documents(required=["architecture"], optional=["compile"])
        config = archive.document("architecture")
        expected = expected_weights(config, archive)
        archive.check_group(WEIGHTS, {key: (shape, dtype) for key, (shape, dtype, _)
                                      in expected.items()}, "the architecture")
        settings = archive.document("compile") if compile and "compile" in archive.documents \
            else None
        optimizer = loss = None
        if settings is not None:
            optimizer, loss = _compile_settings(archive, settings)
            _check_optimizer_state(archive, optimizer, expected)
        # every shape is known good: build with zeros (no random draws) and read into them
        model = _sequential(config, initializer=_zeros, archive=archive)
        own = {**model.params, **model.state}
        for key in archive.weights:
            archive.read_into(WEIGHTS, key, own[key])
        if settings is not None:
            model.compile(optimizer, loss, settings.get("metrics"))
            model.optimizer.load_state_dict({key: archive.read(OPTIMIZER, key)
                                             for key in archive.optimizer})
    return model


# ------------------------------------------------------------- the architecture's shapes

def expected_weights(config, archive=None):
    """{"layer/param": (shape, dtype, trainable)} of the model `config` describes, computed
    by building its layers with zero-stride views for weights: nothing is allocated, however
    large the layers.  Errors in the config raise ArchiveError when `archive` is given."""
    model = _sequential(config, initializer=_shape_only, archive=archive)
    shapes = {key: (value.shape, value.dtype, True) for key, value in model.params.items()}
    shapes.update({key: (value.shape, value.dtype, False) for key, value in model.state.items()})
    return shapes


def _shape_only(shape, rng=None):
    return np.broadcast_to(np.float32(0), shape)


def _zeros(shape, rng=None):
    return np.zeros(shape, np.float32)            # calloc: pages appear as data is read in


def _sequential(config, initializer, archive=None):
    """Sequential from its config; with `initializer`, every weighted layer draws its initial
    weights from it instead of its own (restored afterwards, so get_config is unchanged)."""
    try:
        if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
            raise ValueError(f"an architecture is a dict with a 'layers' list, got "
                             f"{type(config).__name__}")
        layers = [_layer(entry) for entry in config["layers"]]
        saved = [(layer, layer.kernel_initializer, layer.bias_initializer)
                 for layer in layers if hasattr(layer, "kernel_initializer")]
        if initializer is not None:
            for layer, _, _ in saved:
                layer.kernel_initializer = layer.bias_initializer = initializer
        try:
            return Sequential(layers, input_shape=config["input_shape"],
                              seed=config.get("seed", 0), name=config.get("name", "sequential"))
        finally:
            for layer, kernel_initializer, bias_initializer in saved:
                layer.kernel_initializer, layer.bias_initializer = (kernel_initializer,
                                                                    bias_initializer)
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        if archive is None:
            raise
        if isinstance(error, ArchiveError):
            raise
        message = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise archive.error(f"its architecture cannot be built: {message}") from None


def _layer(entry):
    if not isinstance(entry, dict) or "class_name" not in entry:
        raise ValueError(f"a layer entry is a dict with 'class_name' and 'config', got {entry!r}")
    if entry["class_name"] not in LAYER_CLASSES:
        raise ValueError(f"unknown layer class {entry['class_name']!r}; known: "
                         f"{sorted(LAYER_CLASSES)}")
    options = entry.get("config", {})
    if not isinstance(options, dict):
        raise ValueError(f"the config of a {entry['class_name']} layer must be a dict, "
                         f"got {options!r}")
    return LAYER_CLASSES[entry["class_name"]].from_config(options)


# ------------------------------------------------------------------- checks before reading

def _compile_settings(archive, settings):
    if not isinstance(settings, dict) or not {"optimizer", "loss"} <= set(settings):
        raise archive.error(f"its 'compile' settings must be a dict with 'optimizer' and "
                            f"'loss', got {settings!r:.200}")
    metrics = settings.get("metrics") or []
    if not isinstance(metrics, list) or not all(m in ("accuracy", "acc") for m in metrics):
        raise archive.error(f"its 'compile' metrics must be a list of 'accuracy', got "
                            f"{metrics!r:.200}")
    try:
        optimizer = optim.get(settings["optimizer"])
    except (KeyError, TypeError, ValueError) as error:
        raise archive.error(f"its optimizer {settings['optimizer']!r:.200} cannot be made "
                            f"({type(error).__name__}: {error})") from None
    try:
        return optimizer, losses.get(settings["loss"])
    except (KeyError, TypeError, ValueError) as error:
        raise archive.error(f"its loss {settings['loss']!r:.200} cannot be made "
                            f"({type(error).__name__}: {error})") from None


def _check_optimizer_state(archive, optimizer, expected):
    """Optimizer.state_dict() keys: "iterations" and "<slot>/<layer>/<param>" (a slot of the
    param's shape), or "<slot>/" for a scalar slot (Nadam's u_product)."""
    who = type(optimizer).__name__
    if "iterations" not in archive.optimizer:
        raise archive.error(f"its {who} state has no 'iterations'")
    for key, header in archive.optimizer.items():
        if key == "iterations":
            wanted_shape, kinds = (), "iu"
        else:
            slot, _, name = key.partition("/")
            if slot not in optimizer.slot_names:
                raise archive.error(f"optimizer state {key!r}: {who} has no slot {slot!r} "
                                    f"(its slots: {list(optimizer.slot_names)})")
            if name == "":
                wanted_shape, kinds = (), "f"
            elif name in expected and expected[name][2]:
                wanted_shape, kinds = expected[name][0], "f"
            else:
                raise archive.error(f"optimizer state {key!r} names no trainable weight of "
                                    f"the architecture")
        if header.shape != wanted_shape or header.dtype.kind not in kinds:
            raise archive.error(f"optimizer state {key!r} is {header.dtype} of shape "
                                f"{header.shape}; expected shape {wanted_shape}")
