"""Optimizers and learning-rate schedules.

An optimizer updates a flat dict of parameters in place from a dict of gradients with the
same keys ("layer_name/param").  Its state is keyed by those names too, so state_dict()
is a flat dict of arrays that goes into .npz checkpoints and over Dask as it is.
Each optimizer implements one _update(name, param, grad, lr, terms); the update rules are
Keras'. Every optimizer updates float32 parameters in one fused, threaded C pass per
parameter (LARS: a norms pass, then the update), the same bits for any thread count; other
dtypes take NumPy, the float64 reference the tests compare with.

The gradient an update reads is grad / n_samples + the regularizer's gradient (GradientTerms):
Sequential hands a GradientSum's summed gradients and the layers' L1L2 penalties straight to
the C pass, so a step makes no mean or penalty arrays.
"""
import math

import numpy as np

from cnnx import _kernels, _threads

_FLOAT32 = np.dtype(np.float32)       # comparing with the dtype, not the type, skips a lookup


# ------------------------------------------------------------------------------ schedules

class Constant:
    """lr(step) = learning_rate."""

    def __init__(self, learning_rate):
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return self.learning_rate

    def get_config(self):
        return {"name": "Constant", "learning_rate": self.learning_rate}


class StepDecay:
    """lr(step) = learning_rate * gamma ** (step // step_size)."""

    def __init__(self, learning_rate, step_size, gamma=0.1):
        if step_size < 1:
            raise ValueError(f"StepDecay expects step_size >= 1, got {step_size}")
        self.learning_rate, self.step_size, self.gamma = float(learning_rate), int(step_size), gamma

    def __call__(self, step):
        return self.learning_rate * self.gamma ** (step // self.step_size)

    def get_config(self):
        return {"name": "StepDecay", "learning_rate": self.learning_rate,
                "step_size": self.step_size, "gamma": self.gamma}


class CosineDecay:
    """lr(step) = learning_rate * (alpha + (1 - alpha) * (1 + cos(pi * t)) / 2),
    t = min(step, decay_steps) / decay_steps."""

    def __init__(self, learning_rate, decay_steps, alpha=0.0):
        if decay_steps < 1:
            raise ValueError(f"CosineDecay expects decay_steps >= 1, got {decay_steps}")
        self.learning_rate, self.decay_steps, self.alpha = (float(learning_rate),
                                                            int(decay_steps), alpha)

    def __call__(self, step):
        t = min(step, self.decay_steps) / self.decay_steps
        return self.learning_rate * (self.alpha + (1 - self.alpha) * 0.5 * (1 + np.cos(np.pi * t)))

    def get_config(self):
        return {"name": "CosineDecay", "learning_rate": self.learning_rate,
                "decay_steps": self.decay_steps, "alpha": self.alpha}


_SCHEDULES = {cls.__name__: cls for cls in (Constant, StepDecay, CosineDecay)}


def schedule(learning_rate):
    """A number, a schedule, or a schedule's config -> a callable step -> lr."""
    if isinstance(learning_rate, dict):
        options = {k: v for k, v in learning_rate.items() if k != "name"}
        return _SCHEDULES[learning_rate["name"]](**options)
    if callable(learning_rate):
        return learning_rate
    return Constant(learning_rate)


# ----------------------------------------------------------------------------- optimizers

class GradientTerms:
    """The gradient an update reads: grad / divisor + regularizer.gradient(param).

    divisor is the sample count of a summed gradient (1 for a mean), regularizer an L1L2
    or None. The C updates take it as (divisor, l1, l2); NumPy builds the array."""

    def __init__(self, divisor=1, regularizer=None):
        self.divisor, self.regularizer = divisor, regularizer
        self._options = {"divisor": divisor, "l1": regularizer.l1 if regularizer else 0.0,
                         "l2": regularizer.l2 if regularizer else 0.0}

    def kernel_options(self):
        return self._options

    def of(self, grad, param):
        """The gradient as an array (NumPy path): grad / divisor (+ the penalty's gradient)."""
        if self.divisor != 1:
            grad = grad / grad.dtype.type(self.divisor)
        if self.regularizer is not None:
            grad = grad + self.regularizer.gradient(param)
        return grad


class Optimizer:
    """Base: apply() counts steps and calls _update once per parameter.

    `iterations` counts applied steps; the schedule sees the 0-based step being applied.
    Slots (per-parameter state) live in self.slots[slot_name][param_name].
    """
    slot_names = ()

    def __init__(self, learning_rate):
        self.learning_rate = schedule(learning_rate)
        self.iterations = 0
        self.slots = {slot: {} for slot in self.slot_names}
        self._buffers = {}              # scratch space, not state: never saved

    def __getstate__(self):
        return {**self.__dict__, "_buffers": {}}

    def apply(self, params, grads, n_samples=1, regularizers=None):
        """params[name] -= update(g) in place for every name in grads, where
        g = grads[name] / n_samples + regularizers[name].gradient(params[name]) (a missing
        regularizer adds nothing): summed gradients and penalties go in as they are."""
        regularizers = regularizers or {}
        if not grads.keys() <= params.keys():
            raise KeyError(f"{type(self).__name__}.apply: gradients for unknown parameters "
                           f"{sorted(grads.keys() - params.keys())}")
        lr = self.learning_rate(self.iterations)
        self.iterations += 1
        self._begin_step()
        plain = GradientTerms(n_samples)          # for the params without a regularizer
        for name in sorted(grads):                # fixed order: state updates are reproducible
            param, grad = params[name], grads[name]
            if grad.shape != param.shape:
                raise ValueError(f"{type(self).__name__}.apply: gradient for {name!r} is "
                                 f"{grad.shape}, parameter is {param.shape}")
            regularizer = regularizers.get(name)
            terms = plain if regularizer is None else GradientTerms(n_samples, regularizer)
            if grad.dtype != param.dtype:
                grad = grad.astype(param.dtype)
            self._update(name, param, grad, lr, terms)

    def _begin_step(self):
        """Hook for state shared by all parameters (Nadam's momentum product)."""

    def _update(self, name, param, grad, lr, terms):
        """One step on one parameter; the gradient is terms.of(grad, param) (the C updates
        take terms.kernel_options() instead)."""
        raise NotImplementedError

    def _scratch(self, name, like):
        """A reusable temporary shaped like `like` (updates run in place: the dense kernels
        of our networks hold millions of weights, and every temporary is a pass over them)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = self._buffers[name] = np.empty_like(like)
        return buffer

    def _slot(self, slot, name, like, fill=0.0):
        value = self.slots[slot].get(name)
        if value is None:
            value = self.slots[slot][name] = np.full_like(like, fill)
        return value

    # serialisation: flat arrays, no pickle
    def state_dict(self):
        state = {"iterations": np.array(self.iterations, np.int64)}
        for slot, table in self.slots.items():
            for name, value in table.items():
                state[f"{slot}/{name}"] = value.copy()
        return state

    def load_state_dict(self, state):
        self.iterations = int(state["iterations"])
        self.slots = {slot: {} for slot in self.slot_names}
        for key, value in state.items():
            if key == "iterations":
                continue
            slot, _, name = key.partition("/")
            if slot not in self.slots:
                raise KeyError(f"{type(self).__name__}.load_state_dict: unknown state {key!r}")
            self.slots[slot][name] = np.array(value, copy=True)

    def get_config(self):
        lr = self.learning_rate
        if not hasattr(lr, "get_config"):
            # saving lr(0) instead would silently turn the schedule into a constant on load
            raise ValueError(f"{type(self).__name__}: the learning-rate schedule {lr!r} has no "
                             f"get_config(), so it cannot be saved; use Constant, StepDecay or "
                             f"CosineDecay, or give it a get_config()")
        return {"name": type(self).__name__, "learning_rate": lr.get_config()}


class SGD(Optimizer):
    """momentum 0: p -= lr g.  Else v = momentum v - lr g; p += v
    (nesterov: p += momentum v - lr g)."""
    slot_names = ("velocity",)

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        super().__init__(learning_rate)
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD expects 0 <= momentum < 1, got {momentum}")
        self.momentum, self.nesterov = momentum, nesterov

    def _update(self, name, param, grad, lr, terms):
        if _fused(param, grad):
            velocity = None if self.momentum == 0 else self._slot("velocity", name, param)
            _kernels.sgd_update(param, grad, velocity, lr, self.momentum, self.nesterov,
                                **terms.kernel_options(), n_threads=_threads.get_num_threads())
            return
        grad = terms.of(grad, param)
        step = np.multiply(grad, lr, out=self._scratch(name, param))        # lr g
        if self.momentum == 0:
            param -= step
            return
        velocity = self._slot("velocity", name, param)
        velocity *= self.momentum
        velocity -= step
        if self.nesterov:
            param -= step
            param += np.multiply(velocity, self.momentum, out=step)
        else:
            param += velocity

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


def Momentum(learning_rate=0.01, momentum=0.9):
    return SGD(learning_rate, momentum)


def Nesterov(learning_rate=0.01, momentum=0.9):
    return SGD(learning_rate, momentum, nesterov=True)


class Adagrad(Optimizer):
    """a += g^2;  p -= lr g / (sqrt(a) + epsilon)."""
    slot_names = ("accumulator",)

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7):
        super().__init__(learning_rate)
        self.initial_accumulator_value, self.epsilon = initial_accumulator_value, epsilon

    def _update(self, name, param, grad, lr, terms):
        accumulator = self._slot("accumulator", name, param, self.initial_accumulator_value)
        if _fused(param, grad, accumulator):
            _kernels.rmsprop_update(param, grad, accumulator, 1.0, 1.0, lr, self.epsilon,
                                    **terms.kernel_options(),
                                    n_threads=_threads.get_num_threads())
            return
        grad = terms.of(grad, param)
        work = self._scratch(name, param)
        accumulator += np.multiply(grad, grad, out=work)
        _step_by_root(param, grad, accumulator, lr, self.epsilon, work)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon,
                "initial_accumulator_value": self.initial_accumulator_value}


class Adadelta(Optimizer):
    """Zeiler 2012: Eg = rho Eg + (1-rho) g^2;  d = sqrt(Ed + eps) / sqrt(Eg + eps) g;
    Ed = rho Ed + (1-rho) d^2;  p -= lr d.  (lr 1.0 is the paper's; Keras defaults to 0.001.)"""
    slot_names = ("accumulated_grad", "accumulated_delta")

    def __init__(self, learning_rate=1.0, rho=0.95, epsilon=1e-6):
        super().__init__(learning_rate)
        self.rho, self.epsilon = rho, epsilon

    def _update(self, name, param, grad, lr, terms):
        mean_grad = self._slot("accumulated_grad", name, param)
        mean_delta = self._slot("accumulated_delta", name, param)
        if _fused(param, grad, mean_grad, mean_delta):
            _kernels.adadelta_update(param, grad, mean_grad, mean_delta, self.rho, 1 - self.rho,
                                     lr, self.epsilon, **terms.kernel_options(),
                                     n_threads=_threads.get_num_threads())
            return
        grad = terms.of(grad, param)
        _moving_average(mean_grad, grad * grad, self.rho)
        delta = np.sqrt(mean_delta + self.epsilon) / np.sqrt(mean_grad + self.epsilon) * grad
        _moving_average(mean_delta, delta * delta, self.rho)
        param -= delta * lr

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


class RMSprop(Optimizer):
    """v = rho v + (1-rho) g^2;  p -= lr g / (sqrt(v) + epsilon)."""
    slot_names = ("velocity",)

    def __init__(self, learning_rate=0.001, rho=0.9, epsilon=1e-7):
        super().__init__(learning_rate)
        self.rho, self.epsilon = rho, epsilon

    def _update(self, name, param, grad, lr, terms):
        velocity = self._slot("velocity", name, param)
        if _fused(param, grad, velocity):
            _kernels.rmsprop_update(param, grad, velocity, self.rho, 1 - self.rho, lr,
                                    self.epsilon, **terms.kernel_options(),
                                    n_threads=_threads.get_num_threads())
            return
        grad = terms.of(grad, param)
        work = self._scratch(name, param)
        _moving_average(velocity, np.multiply(grad, grad, out=work), self.rho)
        _step_by_root(param, grad, velocity, lr, self.epsilon, work)

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


class Adam(Optimizer):
    """Kingma & Ba 2015, Algorithm 1: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + epsilon)."""
    slot_names = ("m", "v")

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def _update(self, name, param, grad, lr, terms):
        m, v = self._slot("m", name, param), self._slot("v", name, param)
        t = self.iterations
        if _fused(param, grad, m, v):
            root = math.sqrt(1 - self.beta_2 ** t)          # np.sqrt's bits, without NumPy
            _kernels.adam_update(param, grad, m, v, self.beta_1, 1 - self.beta_1, self.beta_2,
                                 1 - self.beta_2, lr * root / (1 - self.beta_1 ** t),
                                 self.epsilon * root, **terms.kernel_options(),
                                 n_threads=_threads.get_num_threads())
            return
        grad = terms.of(grad, param)
        work = self._scratch(name, param)
        _moving_average(m, grad, self.beta_1, work)
        _moving_average(v, np.multiply(grad, grad, out=work), self.beta_2)
        # m_hat / (sqrt(v_hat) + eps) with the bias corrections folded into two scalars:
        # = m / (sqrt(v) + eps sqrt(1 - b2^t)) * sqrt(1 - b2^t) / (1 - b1^t)
        root = np.sqrt(1 - self.beta_2 ** t)
        _step_by_root(param, m, v, lr * root / (1 - self.beta_1 ** t), self.epsilon * root, work)

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon}


class AdaMax(Adam):
    """Kingma & Ba 2015, Algorithm 2: m = b1 m + (1-b1) g;  u = max(b2 u, |g|);
    p -= lr / (1 - b1^t) m / (u + epsilon)."""
    slot_names = ("m", "u")

    def __init__(self, learning_rate=0.002, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate, beta_1, beta_2, epsilon)

    def _update(self, name, param, grad, lr, terms):
        m, u = self._slot("m", name, param), self._slot("u", name, param)
        if _fused(param, grad, m, u):
            _kernels.adamax_update(param, grad, m, u, self.beta_1, 1 - self.beta_1, self.beta_2,
                                   lr / (1 - self.beta_1 ** self.iterations), self.epsilon,
                                   **terms.kernel_options(),
                                   n_threads=_threads.get_num_threads())
            return
        grad = terms.of(grad, param)
        work = self._scratch(name, param)
        _moving_average(m, grad, self.beta_1, work)
        u *= self.beta_2
        np.maximum(u, np.abs(grad, out=work), out=u)
        np.add(u, self.epsilon, out=work)
        np.divide(m, work, out=work)
        work *= lr / (1 - self.beta_1 ** self.iterations)
        param -= work


class Nadam(Adam):
    """Dozat 2016 as in Keras, with the momentum schedule mu_t = b1 (1 - 0.5 * 0.96^(0.004 t)):
    m_hat = mu_{t+1} m / (1 - prod_{i<=t+1} mu_i) + (1 - mu_t) g / (1 - prod_{i<=t} mu_i);
    v_hat = v / (1 - b2^t);  p -= lr m_hat / (sqrt(v_hat) + epsilon)."""
    slot_names = ("m", "v", "u_product")      # u_product holds one scalar, under the name ""

    def _mu(self, t):
        return self.beta_1 * (1 - 0.5 * 0.96 ** (0.004 * t))

    def _begin_step(self):
        t = self.iterations
        product = self.slots["u_product"].get("", np.array(1.0))
        self._mu_t, self._mu_next = self._mu(t), self._mu(t + 1)
        self._product_t = float(product) * self._mu_t
        self.slots["u_product"][""] = np.array(self._product_t)

    def _update(self, name, param, grad, lr, terms):
        m, v = self._slot("m", name, param), self._slot("v", name, param)
        m_scale = self._mu_next / (1 - self._product_t * self._mu_next)
        grad_scale = (1 - self._mu_t) / (1 - self._product_t)
        if _fused(param, grad, m, v):
            root = math.sqrt(1 - self.beta_2 ** self.iterations)    # v_hat = v / root^2
            _kernels.adam_update(param, grad, m, v, self.beta_1, 1 - self.beta_1, self.beta_2,
                                 1 - self.beta_2, lr * root, self.epsilon * root,
                                 m_scale=m_scale, grad_scale=grad_scale,
                                 **terms.kernel_options(),
                                 n_threads=_threads.get_num_threads())
            return
        root = np.sqrt(1 - self.beta_2 ** self.iterations)      # np.float64: it sets the
        # float32 arrays' promotions below, as it always did
        grad = terms.of(grad, param)
        work = self._scratch(name, param)
        _moving_average(m, grad, self.beta_1, work)
        _moving_average(v, np.multiply(grad, grad, out=work), self.beta_2)
        m_hat = np.multiply(m, m_scale)
        m_hat += np.multiply(grad, grad_scale, out=work)
        _step_by_root(param, m_hat, v, lr * root, self.epsilon * root, work)


class LARS(Optimizer):
    """You, Gitman & Ginsburg 2017 (Algorithm 1), per parameter tensor:
    local_lr = eta ||w|| / (||g|| + weight_decay ||w||)   (1 when either norm is 0);
    v = momentum v + lr local_lr (g + weight_decay w);  w -= v."""
    slot_names = ("velocity",)

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=0.0005, eta=0.001):
        super().__init__(learning_rate)
        self.momentum, self.weight_decay, self.eta = momentum, weight_decay, eta

    def _update(self, name, param, grad, lr, terms):
        velocity = self._slot("velocity", name, param)
        if _fused(param, grad, velocity):
            options = dict(**terms.kernel_options(), n_threads=_threads.get_num_threads())
            norms = _kernels.lars_norms(param, grad, **options)
            _kernels.lars_update(param, grad, velocity, self.momentum, self.weight_decay,
                                 lr * self._local_rate(*norms), **options)
            return
        grad = terms.of(grad, param)
        norms = (float(np.linalg.norm(param)), float(np.linalg.norm(grad)))
        velocity *= self.momentum
        velocity += (grad + param * self.weight_decay) * (lr * self._local_rate(*norms))
        param -= velocity

    def _local_rate(self, weight_norm, grad_norm):
        if weight_norm > 0 and grad_norm > 0:
            return self.eta * weight_norm / (grad_norm + self.weight_decay * weight_norm)
        return 1.0

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "weight_decay": self.weight_decay, "eta": self.eta}


def _fused(*arrays):
    """True when the C update applies: float32, C-contiguous, writeable, not empty."""
    for a in arrays:                      # a loop, not all(...): this runs for every param
        if a.dtype != _FLOAT32 or not a.flags.c_contiguous or a.size == 0:
            return False
    return arrays[0].flags.writeable


def _moving_average(average, value, decay, work=None):
    """average = decay * average + (1 - decay) * value, in place (value is consumed when
    no work buffer is given)."""
    average *= decay
    scaled = np.multiply(value, 1 - decay, out=value if work is None else work)
    average += scaled


def _step_by_root(param, numerator, square, lr, epsilon, work):
    """param -= lr * numerator / (sqrt(square) + epsilon), through one work buffer."""
    np.sqrt(square, out=work)
    work += epsilon
    np.divide(numerator, work, out=work)
    work *= lr
    param -= work


_BY_NAME = {cls.__name__: cls for cls in (SGD, Adagrad, Adadelta, RMSprop, Adam, AdaMax, Nadam,
                                          LARS)}


def get(optimizer, **options):
    """An Optimizer, its get_config(), or a name ('adam', 'momentum', ...) built with options."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, dict):
        options = {k: v for k, v in optimizer.items() if k != "name"}
        return _BY_NAME[optimizer["name"]](**options)
    makers = {name.lower(): cls for name, cls in _BY_NAME.items()}
    makers.update(momentum=Momentum, nesterov=Nesterov)
    if not isinstance(optimizer, str) or optimizer.lower() not in makers:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected an Optimizer or one of "
                         f"{sorted(makers)}")
    return makers[optimizer.lower()](**options)
