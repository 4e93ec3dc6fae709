"""A user's own flow model, as README's "Bring your own model" describes one: a factory returning a module.

Samples have shape (2, 1) (not flat, so the adapter's reshaping is exercised). The velocity is the exact one of
data N(mean, I), v(x, t) = mean + c(t) (x - t mean) with c(t) = (2t - 1)/(t^2 + (1 - t)^2), plus a trainable
linear correction in (x, t) that starts at zero: as built, the model's law is N(mean, I) exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

SHAPE = (2, 1)


class _GaussianFlow(nn.Module):
    def __init__(self, mean: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(SHAPE))
        self.correction = nn.Linear(3, 2)  # [x (2), t] -> velocity (2)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, x: Tensor, t: Tensor, cond: None) -> Tensor:
        assert x.shape[1:] == SHAPE and t.shape == (x.shape[0],) and cond is None
        s = t[:, None, None]
        slope = (2 * s - 1) / (s * s + (1 - s) ** 2)
        exact = self.mean + slope * (x - s * self.mean)
        correction = self.correction(torch.cat([x.flatten(1), t[:, None]], dim=1))
        return exact + correction.reshape(x.shape)


def gaussian_flow(mean: list[float] = (0.0, 0.0)) -> nn.Module:  # type: ignore[assignment]
    """The factory: ``model.target: user_flow_model:gaussian_flow``, ``model.kwargs: {mean: [...]}``."""
    return _GaussianFlow(list(mean))


def source(n: int, seed: int, mean: list[float] = (0.0, 0.0)) -> np.ndarray:  # type: ignore[assignment]
    """Data N(mean, I), (n, 2), flattened (2, 1) samples."""
    return np.random.default_rng(seed).normal(size=(n, 2)) + np.asarray(mean)


def first_coordinate(x: Tensor) -> Tensor:
    """The reward r(x) = x_0 (differentiable)."""
    return x[:, 0]
