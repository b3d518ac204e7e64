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
    """Adam (Kingma & Ba) on float64 master weights and moments.

    float64 because an update lr·m/√v ≈ 1e-4 · 1e-2 relative would round away in float32 weights, and the
    factors are few parameters by construction (three float64 copies of a compressed model's factors).
    """

    def __init__(self, params: dict[str, np.ndarray], beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.beta1, self.beta2, self.eps, self.t = beta1, beta2, eps, 0

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for name, p in self.params.items():
            g = grads[name].astype(np.float64)
            self.m[name] = self.beta1 * self.m[name] + (1 - self.beta1) * g
            self.v[name] = self.beta2 * self.v[name] + (1 - self.beta2) * g * g
            p -= lr * (self.m[name] / c1) / (np.sqrt(self.v[name] / c2) + self.eps)
