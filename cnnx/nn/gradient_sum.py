"""GradientSum: what one shard's forward/backward returns; sums of them compose."""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GradientSum:
    """grads: {"layer/param": array} summed over n_samples (the loss sum's gradient, without
    regularisation).  state: BatchNorm moving statistics after this batch ({} without BN)."""
    grads: dict
    n_samples: int
    loss_sum: float
    n_correct: int = 0
    state: dict = field(default_factory=dict)

    def __add__(self, other):
        if not isinstance(other, GradientSum):
            return NotImplemented
        if self.grads.keys() != other.grads.keys():
            raise ValueError(f"GradientSum: cannot add sums over different parameters "
                             f"({sorted(self.grads)} vs {sorted(other.grads)})")
        total = self.n_samples + other.n_samples
        # state is a per-sample weighted mean, so adding stays associative up to rounding
        state = {name: (self.state[name] * self.n_samples + other.state[name] * other.n_samples)
                 / max(total, 1) for name in self.state}
        return GradientSum(grads={name: self.grads[name] + other.grads[name]
                                  for name in self.grads},
                           n_samples=total, loss_sum=self.loss_sum + other.loss_sum,
                           n_correct=self.n_correct + other.n_correct,
                           state={k: v.astype(np.float32) for k, v in state.items()})

    def mean_grads(self):
        """grads / n_samples: what apply_gradients expects."""
        return {name: grad / grad.dtype.type(self.n_samples) for name, grad in self.grads.items()}
