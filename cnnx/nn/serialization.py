"""save_model / load_model: one .npz (allow_pickle=False) holding the architecture as JSON,
the weights, and optionally the optimizer's config and state.

Keys: "architecture" (0-d str array of JSON), "weights/<layer>/<param>",
"compile" (JSON of optimizer and loss configs), "optimizer/<state key>".
"""
import json
import os

import numpy as np

from cnnx import optim
from cnnx.nn import convolution, core, normalization, pooling
from cnnx.nn.model import Sequential

LAYER_CLASSES = {cls.__name__: cls for cls in (
    convolution.Conv2D, core.Dense, core.Flatten, core.Dropout, core.Activation, core.ReLU,
    core.LeakyReLU, core.Softmax, pooling.MaxPool2D, pooling.AvgPool2D,
    normalization.BatchNormalization)}


def model_from_config(config):
    """A freshly initialised Sequential from Sequential.get_config()."""
    layers = []
    for entry in config["layers"]:
        if entry["class_name"] not in LAYER_CLASSES:
            raise ValueError(f"load_model: unknown layer class {entry['class_name']!r}; "
                             f"known: {sorted(LAYER_CLASSES)}")
        layers.append(LAYER_CLASSES[entry["class_name"]].from_config(entry["config"]))
    return Sequential(layers, input_shape=config["input_shape"], seed=config["seed"],
                      name=config["name"])


def save_model(model, path, include_optimizer=True):
    """Write model to path (".npz" appended if missing, as numpy does), atomically."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    arrays = {"architecture": np.array(json.dumps(model.get_config()))}
    arrays.update({f"weights/{key}": value for key, value in model.get_weights().items()})
    if include_optimizer and model.optimizer is not None:
        arrays["compile"] = np.array(json.dumps({
            "optimizer": model.optimizer.get_config(), "loss": model.loss.get_config(),
            "metrics": model.metrics}))
        arrays.update({f"optimizer/{key}": value
                       for key, value in model.optimizer.state_dict().items()})
    temporary = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def load_model(path, compile=True):
    """The model save_model wrote: same architecture, weights and (if saved) optimizer state."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"                            # save_model appends it, as numpy does
    with np.load(path, allow_pickle=False) as archive:
        model = model_from_config(json.loads(str(archive["architecture"])))
        model.set_weights({key[len("weights/"):]: archive[key] for key in archive.files
                           if key.startswith("weights/")})
        if compile and "compile" in archive.files:
            settings = json.loads(str(archive["compile"]))
            model.compile(optim.get(settings["optimizer"]), settings["loss"], settings["metrics"])
            model.optimizer.load_state_dict({key[len("optimizer/"):]: archive[key]
                                             for key in archive.files
                                             if key.startswith("optimizer/")})
    return model
