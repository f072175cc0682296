"""Training modes for DaskTrainer: each mode object holds the options only it reads.

    DaskTrainer(model, client, mode=Sync())                      # the default
    DaskTrainer(model, client, mode=ADAG(tau=4, local_learning_rate=0.01))
    DaskTrainer(model, client, mode=EASGD(tau=4, alpha=0.5, local_learning_rate=0.01))
"""
from dataclasses import dataclass
from typing import Optional


def _positive_int(who, name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")


def _positive_number(who, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{who}: {name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Sync:
    """Synchronous steps: G virtual shards, a fixed pair-sum tree; the same bits on any
    worker count. weights: "replicated" (each worker keeps the model and its optimizer and
    applies every step's gradient sum: no weights travel per step) or "broadcast" (the
    driver sends the weights every step, 2·N·P per step: the papers' protocol)."""
    weights: str = "replicated"
    name = "sync"

    def __post_init__(self):
        if self.weights not in ("replicated", "broadcast"):
            raise ValueError(f"Sync: weights must be 'replicated' or 'broadcast', "
                             f"got {self.weights!r}")


@dataclass(frozen=True)
class Downpour:
    """Each shard's gradient applied by the driver as it arrives, whatever its staleness."""
    max_in_flight: Optional[int] = None
    name = "downpour"
    window = 1

    def __post_init__(self):
        _positive_int(type(self).__name__, "max_in_flight", self.max_in_flight, allow_none=True)


@dataclass(frozen=True)
class DynSGD(Downpour):
    """Downpour with each gradient scaled by 1 / (staleness + 1)."""
    name = "dynsgd"


@dataclass(frozen=True)
class ADAG:
    """tau local SGD steps per unit; the driver adds the change scaled by 1/(staleness+1)."""
    tau: int = 4
    local_learning_rate: float = 0.01
    max_in_flight: Optional[int] = None
    name = "adag"

    def __post_init__(self):
        who = type(self).__name__
        _positive_int(who, "tau", self.tau)
        _positive_number(who, "local_learning_rate", self.local_learning_rate)
        _positive_int(who, "max_in_flight", self.max_in_flight, allow_none=True)

    @property
    def window(self):
        return self.tau


@dataclass(frozen=True)
class EASGD(ADAG):
    """tau local SGD steps, then an elastic exchange with the centre of strength alpha."""
    alpha: float = 0.5
    name = "easgd"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"EASGD: alpha must be in (0, 1], got {self.alpha!r}")


MODES = {mode.name: mode for mode in (Sync, Downpour, DynSGD, ADAG, EASGD)}


def from_name(name, tau=4, alpha=0.5, learning_rate=0.01, max_in_flight=None,
              sync_weights="replicated"):
    """The mode object for DaskTrainer's older keyword form (mode="adag", tau=..., ...)."""
    if name not in MODES:
        raise ValueError(f"DaskTrainer: mode must be one of {tuple(MODES)} or a mode object "
                         f"(cnnx.parallel.Sync(), ADAG(tau=4), ...), got {name!r}")
    if name == "sync":
        return Sync(weights=sync_weights)
    if name in ("downpour", "dynsgd"):
        return MODES[name](max_in_flight=max_in_flight)
    if name == "adag":
        return ADAG(tau=tau, local_learning_rate=learning_rate, max_in_flight=max_in_flight)
    return EASGD(tau=tau, alpha=alpha, local_learning_rate=learning_rate,
                 max_in_flight=max_in_flight)
