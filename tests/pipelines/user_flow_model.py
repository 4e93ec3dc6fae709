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


class _ConditionalGaussianFlow(nn.Module):
    """v(x, t, c) = the exact velocity of data N(means[c], I) plus a small MLP correction on [x, t, onehot(c)]
    whose last layer starts at zero: as built, condition c's law is N(means[c], I) exactly."""

    def __init__(self, means: dict[str, list[float]], conditions: list, hidden: int = 64) -> None:
        super().__init__()
        self.conditions = list(conditions)
        table = [list(means[str(c)]) for c in self.conditions]
        self.register_buffer("means", torch.tensor(table, dtype=torch.float32).reshape(len(table), *SHAPE))
        c = len(self.conditions)
        self.correction = nn.Sequential(nn.Linear(3 + c, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                        nn.Linear(hidden, 2))
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)

    def forward(self, x: Tensor, t: Tensor, cond: list) -> Tensor:
        assert x.shape[1:] == SHAPE and t.shape == (x.shape[0],) and len(cond) == x.shape[0]
        index = torch.tensor([self.conditions.index(c) for c in cond], device=x.device)
        mean = self.means[index].to(x.dtype)
        s = t[:, None, None]
        slope = (2 * s - 1) / (s * s + (1 - s) ** 2)
        exact = mean + slope * (x - s * mean)
        onehot = torch.nn.functional.one_hot(index, len(self.conditions)).to(x.dtype)
        correction = self.correction(torch.cat([x.flatten(1), t[:, None], onehot], dim=1))
        return exact + correction.reshape(x.shape)


def conditional_gaussian_flow(means: dict, conditions: list, hidden: int = 64) -> nn.Module:
    """The conditional factory: ``model.kwargs: {means: {a: [-1, 0], b: [1, 0]}}``; tfft adds ``conditions``."""
    return _ConditionalGaussianFlow(dict(means), list(conditions), hidden)


def conditional_source(n: int, seed: int, cond: str, means: dict) -> np.ndarray:
    """Data N(means[cond], I) of one condition, (n, 2)."""
    offset = sum(map(ord, str(cond)))  # a different stream per condition
    return np.random.default_rng(seed + offset).normal(size=(n, 2)) + np.asarray(means[str(cond)])


def first_coordinate_given(x: Tensor, cond: list) -> Tensor:
    """The conditional reward's signature, r(x, cond) = x_0 (it ignores the condition; differentiable)."""
    assert len(cond) == x.shape[0]
    return x[:, 0]
