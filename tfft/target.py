"""Pseudo-reward, the target tilt and tail summaries (DESIGN.md sections 3-5).

Given eta* from :func:`tfft.tail.solve_threshold`, the single fine-tuning run optimises the pseudo-reward
g = (r - eta*)_+ / alpha (right) or g = -(eta* - r)_+ / alpha (left) with KL weight gamma; its optimum is the
target p* ∝ q exp(g / gamma), whose statistics follow exactly from a base bank by self-normalised weights
(their bootstrap interval over the bank: :mod:`tfft.interval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tfft.tail import _as_float64, _as_mask, _check_alpha, _check_kl_weight, _check_side, cvar

__all__ = [
    "TailSummary",
    "effective_sample_size",
    "pseudo_reward",
    "pseudo_reward_grad_scale",
    "summarize",
    "target_summary",
    "tilt_log_weights",
    "tilt_weights",
]


def pseudo_reward(rewards: Any, *, eta: float | None, side: str, alpha: float) -> Any:
    """Pseudo-reward g (DESIGN.md section 3), elementwise; any shape.

    Right: g = (r - eta)_+ / alpha. Left: g = -(eta - r)_+ / alpha. ``eta=None``: the expected-reward
    objective, g = r. A torch tensor gives a differentiable tensor (sub-gradient 0 at r = eta, matching
    :func:`pseudo_reward_grad_scale`); anything else gives a float64 numpy array. ``eta`` may also be an array
    (tensor) of rewards' shape: a per-row threshold (with conditions, each row's condition's eta*_c).
    """
    side, alpha = _check_side(side), _check_alpha(alpha)
    if isinstance(rewards, torch.Tensor):
        if eta is None:
            return rewards.clone()
        if side == "right":
            return torch.relu(rewards - eta) / alpha
        return -torch.relu(eta - rewards) / alpha
    r = np.asarray(rewards, dtype=np.float64)
    if eta is None:
        return r.copy()
    if side == "right":
        return np.maximum(r - eta, 0.0) / alpha
    return -np.maximum(eta - r, 0.0) / alpha


def pseudo_reward_grad_scale(rewards: Any, *, eta: float | None, side: str, alpha: float) -> Any:
    """dg/dr elementwise (DESIGN.md section 6): 1{r > eta} / alpha (right), 1{r < eta} / alpha (left).

    grad_x g = pseudo_reward_grad_scale * grad_x r. ``eta=None`` gives ones. Torch in, tensor out (same dtype and
    device, no gradient); anything else gives a float64 numpy array.
    """
    side, alpha = _check_side(side), _check_alpha(alpha)
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach()
        if eta is None:
            return torch.ones_like(r)
        active = r > eta if side == "right" else r < eta
        return active.to(r.dtype) / alpha
    r = np.asarray(rewards, dtype=np.float64)
    if eta is None:
        return np.ones_like(r)
    active = r > eta if side == "right" else r < eta
    return active.astype(np.float64) / alpha


def tilt_log_weights(
    rewards: Any, *, eta: float | None, side: str, alpha: float, kl_weight: float
) -> np.ndarray:
    """Unnormalised log target weights log w_i = g(x_i) / kl_weight (DESIGN.md section 5); shape (N,).

    NaN rewards give NaN log weights.
    """
    kl_weight = _check_kl_weight(kl_weight)
    r = _as_float64(rewards, "rewards")
    return pseudo_reward(r, eta=eta, side=side, alpha=alpha) / kl_weight


def tilt_weights(
    rewards: Any,
    *,
    eta: float | None,
    side: str,
    alpha: float,
    kl_weight: float,
    valid: Any = None,
) -> np.ndarray:
    """Self-normalised target weights w_i ∝ exp(g(x_i) / kl_weight), summing to 1; shape (N,).

    Computed in the log domain. Non-finite rewards and entries with ``valid`` False get weight 0.
    """
    log_w = tilt_log_weights(rewards, eta=eta, side=side, alpha=alpha, kl_weight=kl_weight)
    keep = np.isfinite(log_w)
    if valid is not None:
        keep &= _as_mask(valid, log_w.size)
    if not keep.any():
        raise ValueError("rewards: no valid finite reward to weight")
    weights = np.zeros_like(log_w)
    shifted = log_w[keep] - log_w[keep].max()
    weights[keep] = np.exp(shifted) / np.exp(shifted).sum()
    return weights


def effective_sample_size(weights: Any) -> float:
    """Kish effective sample size (sum w)^2 / sum w^2 of non-negative weights, shape (N,) (DESIGN.md section 4)."""
    w = _as_float64(weights, "weights")
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0.0):
        raise ValueError("weights: must be a non-empty array of finite, non-negative values")
    peak = w.max()
    if not peak > 0.0:
        raise ValueError("weights: must have a positive sum")
    w = w / peak  # scale-free; avoids overflow in the squares
    return float(w.sum() ** 2 / np.square(w).sum())


@dataclass(frozen=True)
class TailSummary:
    """Mean and CVaR on both sides of a (weighted) reward sample, keyed by level as ``f"{level:g}"``."""

    n: int
    n_valid: int
    mean: float
    cvar_right: dict[str, float]
    cvar_left: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with keys n, n_valid, mean, cvar_right, cvar_left."""
        return {
            "n": int(self.n),
            "n_valid": int(self.n_valid),
            "mean": float(self.mean),
            "cvar_right": {key: float(value) for key, value in self.cvar_right.items()},
            "cvar_left": {key: float(value) for key, value in self.cvar_left.items()},
        }


def summarize(
    rewards: Any,
    *,
    valid: Any = None,
    weights: Any = None,
    levels: Sequence[float] = (0.05, 0.1, 0.2),
) -> TailSummary:
    """Mean and CVaR_level on both sides over the valid finite samples (DESIGN.md sections 3 and 5).

    With ``weights`` (shape (N,), non-negative, e.g. :func:`tilt_weights`) the statistics are those of the
    weighted law, i.e. the exact target statistics from a base bank. If no valid sample remains, the statistics
    are NaN and ``n_valid`` is 0 (an evaluation batch whose simulator failed throughout is still reported).
    """
    r = _as_float64(rewards, "rewards")
    if r.size == 0:
        raise ValueError("rewards: empty")
    levels = tuple(_check_alpha(level) for level in levels)
    keep = np.isfinite(r) if valid is None else np.isfinite(r) & _as_mask(valid, r.size)
    w = None
    if weights is not None:
        w = _as_float64(weights, "weights")
        if w.shape != r.shape:
            raise ValueError(f"weights: expected shape {r.shape}, got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0.0):
            raise ValueError("weights: must be finite and non-negative")
        w = w[keep]
    r = r[keep]
    if r.size == 0:
        nans = {f"{level:g}": math.nan for level in levels}
        return TailSummary(n=int(keep.size), n_valid=0, mean=math.nan, cvar_right=nans, cvar_left=dict(nans))
    if w is not None and not w.sum() > 0.0:
        raise ValueError("weights: must have a positive sum over the valid samples")
    mean = float(np.average(r, weights=w))
    return TailSummary(
        n=int(keep.size),
        n_valid=int(r.size),
        mean=mean,
        cvar_right={f"{a:g}": cvar(r, side="right", alpha=a, weights=w) for a in levels},
        cvar_left={f"{a:g}": cvar(r, side="left", alpha=a, weights=w) for a in levels},
    )


def target_summary(
    rewards: Any,
    *,
    eta: float | None,
    side: str,
    alpha: float,
    kl_weight: float,
    valid: Any = None,
    levels: Sequence[float] = (0.05, 0.1, 0.2),
) -> TailSummary:
    """Statistics of the target p* ∝ q exp(g / kl_weight) from a base bank ``rewards`` of shape (N,) (section 5).

    Self-normalised importance weights; trust them only when the ESS (:func:`effective_sample_size`) is large.
    """
    weights = tilt_weights(rewards, eta=eta, side=side, alpha=alpha, kl_weight=kl_weight, valid=valid)
    return summarize(rewards, valid=valid, weights=weights, levels=levels)
