"""The closed-form check of DESIGN §5: x ~ N(0, 1) in one dimension and the reward r(x) = x.

The exact threshold is known by quadrature (alpha = 0.1, right side: 2.28 at kl_weight 3, 5.22 at
kl_weight 1), so this task measures the threshold error of a finite bank and of refinement.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["standard_normal_1d", "identity_reward"]


def standard_normal_1d(n: int, seed: int) -> np.ndarray:
    """n samples of N(0, 1), shape (n, 1)."""
    return np.random.default_rng(seed).standard_normal((n, 1))


def identity_reward(x: torch.Tensor) -> torch.Tensor:
    """r(x) = x[:, 0], shape (n,)."""
    return x[:, 0]
