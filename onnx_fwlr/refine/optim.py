"""The optimiser of refine, in numpy: Adam on float64 master weights and the learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("cosine", "linear")


def learning_rate(step: int, steps: int, lr: float, schedule: str = "cosine") -> float:
    """Learning rate of step 1..steps: linear warm-up over the first 5 % (at most 50 steps), then cosine or
    linear decay towards zero (never exactly zero on the last step)."""
    warmup = min(50, max(1, steps // 20))
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / (steps - warmup + 1)
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Adam:
    """Adam (Kingma & Ba) on float64 master weights, with moments in the weights' own precision.

    float64 weights because an update lr·m/√v ≈ 1e-4 · 1e-2 relative would round away in float32 weights; the
    moments only scale the step, and float32 carries them to 1e-7 relative (for a float32 model: one float64
    and two float32 copies of its factors, four times their bytes rather than six).
    """

    def __init__(self, params: dict[str, np.ndarray], beta1=0.9, beta2=0.999, eps=1e-8):
        moment = {k: np.result_type(np.asarray(v).dtype, np.float32) for k, v in params.items()}
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.m = {k: np.zeros(v.shape, moment[k]) for k, v in self.params.items()}
        self.v = {k: np.zeros(v.shape, moment[k]) for k, v in self.params.items()}
        self.beta1, self.beta2, self.eps, self.t = beta1, beta2, eps, 0

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for name, p in self.params.items():
            m, v = self.m[name], self.v[name]  # updated in place: long-lived arrays keep their memory
            g = grads[name].astype(m.dtype, copy=False)
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
