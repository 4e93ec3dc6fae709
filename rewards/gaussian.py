"""The closed-form check of DESIGN §5: x ~ N(0, 1) in one dimension and the reward r(x) = x.

The exact threshold is known by quadrature (alpha = 0.1, right side: 2.28 at kl_weight 3, 5.22 at
kl_weight 1), so this task measures the threshold error of a finite bank and of refinement.

Two screens for screened evaluation (``reward.screen``; `pipelines.screening`): :func:`noisy_identity`, the
reward plus N(0, noise^2) noise (a cheap score that ranks like the reward), and :func:`unrelated_score`, noise
alone (a screen that does not rank: the audit must catch it). Their noise is a deterministic function of the
sample's bytes and ``seed``, so a sample always gets the same score.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["standard_normal_1d", "identity_reward", "noisy_identity", "unrelated_score", "row_normals"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def standard_normal_1d(n: int, seed: int) -> np.ndarray:
    """n samples of N(0, 1), shape (n, 1)."""
    return np.random.default_rng(seed).standard_normal((n, 1))


def identity_reward(x: torch.Tensor) -> torch.Tensor:
    """r(x) = x[:, 0], shape (n,)."""
    return x[:, 0]


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_normals(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """One N(0, 1) draw per row of x (n, d), a deterministic function of the row's float64 bytes and ``seed``."""
    bits = np.ascontiguousarray(x, dtype=np.float64).reshape(len(x), -1).view(np.uint64)
    h = np.full(len(x), np.uint64(seed) * _GOLDEN, dtype=np.uint64)
    for column in bits.T:
        h = _mix(h ^ column)
    u1 = ((h >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = ((_mix(h) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def noisy_identity(x: torch.Tensor, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """s(x) = x[:, 0] + noise * e(x), e(x) ~ N(0, 1) fixed per sample (:func:`row_normals`); shape (n,)."""
    e = torch.as_tensor(row_normals(x.detach().cpu().numpy(), seed), dtype=x.dtype, device=x.device)
    return x[:, 0].detach() + noise * e


def unrelated_score(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """s(x) = e(x) ~ N(0, 1), independent of the reward; shape (n,)."""
    return torch.as_tensor(row_normals(x.detach().cpu().numpy(), seed), dtype=torch.float64, device=x.device)
