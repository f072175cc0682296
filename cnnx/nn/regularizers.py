"""Weight penalties added to the loss and to the gradient: l1 * sum|w| + l2 * sum w^2."""
import numpy as np


class L1L2:
    """penalty(w) = l1 * sum(|w|) + l2 * sum(w**2);  gradient = l1 * sign(w) + 2 * l2 * w."""

    def __init__(self, l1=0.0, l2=0.0):
        if l1 < 0 or l2 < 0:
            raise ValueError(f"L1L2 expects non-negative factors, got l1={l1}, l2={l2}")
        self.l1, self.l2 = float(l1), float(l2)

    def __call__(self, weight):
        penalty = 0.0
        if self.l1:
            penalty += self.l1 * float(np.abs(weight).sum(dtype=np.float64))
        if self.l2:
            penalty += self.l2 * float(np.square(weight, dtype=np.float64).sum())
        return penalty

    def gradient(self, weight):
        grad = np.zeros_like(weight)
        if self.l1:
            grad += self.l1 * np.sign(weight)
        if self.l2:
            grad += (2 * self.l2) * weight
        return grad

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


def L1(l1=0.01):
    return L1L2(l1=l1)


def L2(l2=0.01):
    return L1L2(l2=l2)


def get(regularizer):
    """None, an L1L2, its config dict, or 'l1' / 'l2' / 'l1_l2' with Keras' default 0.01."""
    if regularizer is None or isinstance(regularizer, L1L2):
        return regularizer
    if isinstance(regularizer, dict):
        return L1L2(**regularizer)
    defaults = {"l1": L1L2(l1=0.01), "l2": L1L2(l2=0.01), "l1_l2": L1L2(0.01, 0.01)}
    if regularizer not in defaults:
        raise ValueError(f"unknown regularizer {regularizer!r}; expected an L1L2 or one of "
                         f"{sorted(defaults)}")
    return defaults[regularizer]
