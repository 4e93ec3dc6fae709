"""Conditions (class labels, prompts, molecules) as an optional axis of every sample.

A conditional flow model has a velocity v(x, t, c): one flow per condition c, q_c its law. The library passes
conditions as ``cond``, a LongTensor (n,) of indices into the user's list of condition values (the model maps
indices to values, `tfft.user_model.FlatVelocity`); ``cond=None`` is the unconditional case, and then every
velocity is called as before, ``velocity(x, t)``.

The fine-tuning target with C conditions is one tilt per condition, p*_c ∝ q_c exp(g_c / gamma), with the
threshold eta*_c solved on that condition's bank rows (or one eta* on the pooled bank); its pooled law is the
mixture (1/C) sum_c p*_c, so a tilt weight vector over a bank with a condition column is normalised per
condition to sum 1/C (:func:`per_condition_weights`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["call_velocity", "per_condition_weights", "row_values", "uniform_conditions"]


def call_velocity(velocity: Any, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    """``velocity(x, t)`` without conditions, ``velocity(x, t, cond)`` with them; x (n, d), t (n,), cond (n,)."""
    return velocity(x, t) if cond is None else velocity(x, t, cond)


def uniform_conditions(
    n: int, n_conditions: int, *, generator: torch.Generator | None = None, device: Any = None
) -> Tensor:
    """n condition indices drawn uniformly from [0, C), LongTensor (n,) (seeded by ``generator``)."""
    if n_conditions < 1:
        raise ValueError(f"n_conditions must be >= 1, got {n_conditions}")
    return torch.randint(0, n_conditions, (n,), generator=generator, device=device)


def per_condition_weights(weights: Any, cond: Any, n_conditions: int | None = None) -> np.ndarray:
    """Non-negative weights (N,) normalised within each condition so that each condition's sum is 1/C.

    ``cond`` (N,) holds condition indices; C counts the conditions with a positive total (a condition whose rows
    all have weight 0 keeps them at 0 and does not count), at most ``n_conditions`` when given. The result is the
    mixture (1/C) sum_c w_c / sum(w_c): the pooled law of the per-condition tilts.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    c = np.asarray(cond, dtype=np.int64).reshape(-1)
    if w.shape != c.shape:
        raise ValueError(f"weights and cond must have the same shape, got {w.shape} and {c.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    size = int(c.max()) + 1 if c.size else 0
    if n_conditions is not None:
        if c.size and (c.min() < 0 or c.max() >= n_conditions):
            raise ValueError(f"cond must lie in [0, {n_conditions})")
        size = n_conditions
    totals = np.bincount(c, weights=w, minlength=size)
    present = totals > 0
    if not present.any():
        raise ValueError("weights must not all be zero")
    scale = np.where(present, 1.0 / np.where(present, totals, 1.0), 0.0) / present.sum()
    return w * scale[c]


def row_values(values: Any, cond: Any) -> Any:
    """A per-condition value per row: ``values`` a scalar (the same for every row) or a sequence (C,) indexed by
    ``cond`` (N,); a torch ``cond`` gives a tensor, a numpy one an array."""
    if values is None or np.isscalar(values):
        return values
    if isinstance(cond, Tensor):
        return torch.as_tensor(list(values), dtype=torch.float64, device=cond.device)[cond]
    return np.asarray(list(values), dtype=np.float64)[np.asarray(cond, dtype=np.int64)]
