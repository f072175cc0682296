"""Weight initializers: (shape, rng) -> float32 array.  Fans follow Keras (HWIO kernels)."""
import numpy as np


def _fans(shape):
    # Dense (I, U): fan_in I, fan_out U.  Conv (KH, KW, C, F): receptive field times C or F.
    if len(shape) < 2:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


def zeros(shape, rng=None):
    return np.zeros(shape, np.float32)


def ones(shape, rng=None):
    return np.ones(shape, np.float32)


def glorot_uniform(shape, rng):
    fan_in, fan_out = _fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def glorot_normal(shape, rng):
    fan_in, fan_out = _fans(shape)
    return _truncated_normal(shape, np.sqrt(2.0 / (fan_in + fan_out)), rng)


def he_uniform(shape, rng):
    fan_in, _ = _fans(shape)
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def he_normal(shape, rng):
    fan_in, _ = _fans(shape)
    return _truncated_normal(shape, np.sqrt(2.0 / fan_in), rng)


def _truncated_normal(shape, stddev, rng):
    # Keras draws from a normal truncated at 2 sigma; 0.8796 restores the wanted stddev
    scale = stddev / 0.87962566103423978
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return (values * scale).astype(np.float32)


_BY_NAME = {f.__name__: f for f in (zeros, ones, glorot_uniform, glorot_normal, he_uniform,
                                     he_normal)}


def get(initializer):
    """An initializer from its Keras name (or a callable, returned as is)."""
    if callable(initializer):
        return initializer
    if initializer not in _BY_NAME:
        raise ValueError(f"unknown initializer {initializer!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[initializer]


def name_of(initializer):
    """The name get() accepts back, for get_config()."""
    for name, function in _BY_NAME.items():
        if function is initializer or name == initializer:
            return name
    raise ValueError(f"initializer {initializer!r} has no name and cannot be saved")
