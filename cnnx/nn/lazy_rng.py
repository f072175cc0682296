"""A random generator made on first use: Sequential.gradient hands one to every layer each
step, and most networks draw nothing (making a Generator costs ~20 us, a few % of the
Python time of a small network's step)."""
import numpy as np


class LazyRng:
    """np.random.default_rng(seed), created when a layer first asks it for anything: the
    same draws as the generator itself."""

    __slots__ = ("_seed", "_generator")

    def __init__(self, seed):
        self._seed = seed
        self._generator = None

    def __getattr__(self, name):          # only names the object lacks: the Generator's
        if self._generator is None:
            self._generator = np.random.default_rng(self._seed)
        return getattr(self._generator, name)
