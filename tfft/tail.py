"""Tail statistics (VaR, CVaR) and the exact CVaR threshold solver on a finite bank (DESIGN.md sections 3-4).

Conventions (DESIGN.md section 2): ``alpha`` in (0, 1] is the tail mass on either side, ``side`` is ``"right"``
(upper tail, the best ``alpha`` fraction) or ``"left"`` (lower tail, the worst ``alpha`` fraction), and
``kl_weight`` is gamma > 0, the weight of KL(p || q). Rewards may be a list, a 1-D numpy array or a torch tensor;
computations run in float64 numpy and results are Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Threshold", "cvar", "solve_threshold", "threshold_objective", "var"]

# Relative slack when cumulative weights are compared with alpha: 0.1 * 7 must count as 0.7 of the mass.
_MASS_RTOL = 1e-12


def _as_float64(values: Any, name: str) -> np.ndarray:
    """Converts a list, numpy array or torch tensor to a 1-D float64 numpy array (a copy for tensors)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {array.shape}")
    return array


def _as_mask(valid: Any, n: int) -> np.ndarray:
    """Converts a validity mask (list, numpy or torch) to a boolean array of length ``n``."""
    if isinstance(valid, torch.Tensor):
        valid = valid.detach().cpu().numpy()
    mask = np.asarray(valid, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"valid: expected shape ({n},), got {mask.shape}")
    return mask


def _check_side(side: str) -> str:
    if side not in ("right", "left"):
        raise ValueError(f"side: expected 'right' or 'left', got {side!r}")
    return side


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha: expected a tail mass in (0, 1], got {alpha}")
    return alpha


def _check_kl_weight(kl_weight: float) -> float:
    kl_weight = float(kl_weight)
    if not (math.isfinite(kl_weight) and kl_weight > 0.0):
        raise ValueError(f"kl_weight: expected a finite value > 0, got {kl_weight}")
    return kl_weight


def _finite_rewards(rewards: Any) -> np.ndarray:
    r = _as_float64(rewards, "rewards")
    if r.size == 0:
        raise ValueError("rewards: empty")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards: contains NaN or inf; drop invalid samples first")
    return r


def _weights_for(r: np.ndarray, weights: Any) -> np.ndarray:
    """Validated non-negative weights of the same length as ``r`` (ones when ``weights`` is None)."""
    if weights is None:
        return np.ones_like(r)
    w = _as_float64(weights, "weights")
    if w.shape != r.shape:
        raise ValueError(f"weights: expected shape {r.shape}, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0.0):
        raise ValueError("weights: must be finite and non-negative")
    if not w.sum() > 0.0:
        raise ValueError("weights: must have a positive sum")
    return w


def _upper_tail(r: np.ndarray, w: np.ndarray, alpha: float) -> tuple[float, float]:
    """(VaR, CVaR) of the best ``alpha`` fraction of the weighted mass; boundary sample counted fractionally."""
    keep = w > 0.0
    r, w = r[keep], w[keep]
    order = np.argsort(-r, kind="stable")
    r, w = r[order], w[order]
    cum = np.cumsum(w)
    budget = alpha * cum[-1]
    boundary = min(int(np.searchsorted(cum, budget * (1.0 - _MASS_RTOL), side="left")), r.size - 1)
    taken = np.clip(budget - (cum - w), 0.0, w)  # mass of each sample inside the tail
    return float(r[boundary]), float(np.dot(taken, r) / taken.sum())


def _tail(rewards: Any, side: str, alpha: float, weights: Any) -> tuple[float, float]:
    """(VaR, CVaR) on ``side``; the left tail of r is minus the right tail of -r."""
    side, alpha = _check_side(side), _check_alpha(alpha)
    r = _finite_rewards(rewards)
    w = _weights_for(r, weights)
    if side == "right":
        return _upper_tail(r, w, alpha)
    level, mean = _upper_tail(-r, w, alpha)
    return -level, -mean


def var(rewards: Any, *, side: str, alpha: float, weights: Any = None) -> float:
    """alpha-VaR: the reward level at which the tail of mass ``alpha`` starts (DESIGN.md section 3).

    Right: the upper alpha-quantile, the first reward in descending order at which the cumulative (normalised)
    weight reaches ``alpha``; it minimises eta + E[(r - eta)_+] / alpha. Left: the lower alpha-quantile.

    Args:
        rewards: shape (N,), finite.
        side: ``"right"`` or ``"left"``.
        alpha: tail mass in (0, 1].
        weights: optional shape (N,) non-negative sample weights (normalised internally).
    """
    return _tail(rewards, side, alpha, weights)[0]


def cvar(rewards: Any, *, side: str, alpha: float, weights: Any = None) -> float:
    """alpha-CVaR: the (weighted) mean reward over the best (right) or worst (left) ``alpha`` mass (section 3).

    CVaR+_alpha = min_eta {eta + E[(r - eta)_+] / alpha}, CVaR-_alpha = max_eta {eta - E[(eta - r)_+] / alpha};
    on a bank the boundary sample contributes the fractional remainder of the mass. ``alpha = 1`` is the mean.

    Args:
        rewards: shape (N,), finite.
        side: ``"right"`` or ``"left"``.
        alpha: tail mass in (0, 1].
        weights: optional shape (N,) non-negative sample weights (normalised internally).
    """
    return _tail(rewards, side, alpha, weights)[1]


@dataclass(frozen=True)
class Threshold:
    """Solution of the threshold problem on a bank (DESIGN.md sections 3-4).

    ``eta`` is eta*, ``value`` is J(eta*), ``tail_mass`` is the target mass beyond eta* under the tilt
    w_i ∝ exp(g_i / kl_weight), ``ess`` = (sum w)^2 / sum w^2, ``active_fraction`` is the fraction of valid
    bank samples where the pseudo-reward g has a nonzero gradient.
    """

    eta: float
    value: float
    tail_mass: float
    ess: float
    active_fraction: float
    side: str
    alpha: float
    kl_weight: float
    n_valid: int
    n_invalid: int

    def to_dict(self) -> dict[str, float]:
        """The five headline fields as floats."""
        return {name: float(getattr(self, name)) for name in ("eta", "value", "tail_mass", "ess", "active_fraction")}


def _log_tilt(r: np.ndarray, eta: float, side: str, scale: float) -> np.ndarray:
    """g / kl_weight = (r - eta)_+ / scale (right) or -(eta - r)_+ / scale (left), scale = alpha * kl_weight."""
    if side == "right":
        return np.maximum(r - eta, 0.0) / scale
    return -np.maximum(eta - r, 0.0) / scale


def _logsumexp(x: np.ndarray) -> float:
    peak = float(np.max(x))
    return peak + math.log(float(np.sum(np.exp(x - peak))))


def threshold_objective(eta: float, rewards: Any, *, side: str, alpha: float, kl_weight: float) -> float:
    """J(eta) of DESIGN.md section 3, in the log domain.

    J_R(eta) = eta + gamma log E_q exp((r - eta)_+ / (alpha gamma))   (right; minimised over eta)
    J_L(eta) = eta + gamma log E_q exp(-(eta - r)_+ / (alpha gamma))  (left; maximised over eta)
    with gamma = ``kl_weight`` and E_q the mean over the bank ``rewards`` of shape (N,) (all finite).
    """
    side, alpha, kl_weight = _check_side(side), _check_alpha(alpha), _check_kl_weight(kl_weight)
    r = _finite_rewards(rewards)
    eta = float(eta)
    log_mean = _logsumexp(_log_tilt(r, eta, side, alpha * kl_weight)) - math.log(r.size)
    return eta + kl_weight * log_mean


def _solve_right(u: np.ndarray, counts: np.ndarray, alpha: float, kl_weight: float) -> tuple[int | None, float]:
    """Exact argmin of the convex J_R (alpha < 1) on sorted unique rewards ``u``: (knot index, nan) or (None, eta)."""
    scale = alpha * kl_weight
    suffix = np.logaddexp.accumulate((np.log(counts) + u / scale)[::-1])[::-1]
    log_above = np.append(suffix[1:], -np.inf)  # log A_j: log sum of exp(r / scale) over r > u_j
    log_below = np.log(np.cumsum(counts))  # log B_j: log count of r <= u_j
    log_total = math.log(counts.sum())

    def objective(eta: np.ndarray, log_b: np.ndarray, log_a: np.ndarray) -> np.ndarray:
        return eta + kl_weight * (np.logaddexp(log_b, log_a - eta / scale) - log_total)

    knot_values = objective(u, log_below, log_above)
    best_knot = int(np.argmin(knot_values))
    if u.size == 1:
        return best_knot, math.nan
    # Segment (u_j, u_{j+1}): eta = alpha gamma [log A - log B + log((1 - alpha) / alpha)].
    roots = scale * (log_above[:-1] - log_below[:-1] + math.log((1.0 - alpha) / alpha))
    inside = np.flatnonzero((roots > u[:-1]) & (roots < u[1:]))
    if inside.size == 0:
        return best_knot, math.nan
    root_values = objective(roots[inside], log_below[inside], log_above[inside])
    best_root = int(np.argmin(root_values))
    if root_values[best_root] < knot_values[best_knot]:
        return None, float(roots[inside[best_root]])
    return best_knot, math.nan


def _solve_left(u: np.ndarray, counts: np.ndarray, alpha: float, kl_weight: float) -> int:
    """Index of the knot u_j maximising J_L (J_L is convex between knots, so the maximum sits on one)."""
    scale = alpha * kl_weight
    prefix = np.logaddexp.accumulate(np.log(counts) + u / scale)
    log_below = np.concatenate(([-np.inf], prefix[:-1]))  # log sum over rewards strictly below u_j
    n_at_or_above = counts.sum() - np.cumsum(counts) + counts
    log_inner = np.logaddexp(np.log(n_at_or_above), log_below - u / scale)
    values = u + kl_weight * (log_inner - math.log(counts.sum()))
    return int(np.argmax(values))


def solve_threshold(
    rewards: Any, *, side: str, alpha: float, kl_weight: float, valid: Any = None
) -> Threshold:
    """Exact eta* on a finite bank (DESIGN.md sections 3-4), O(N log N).

    Right: eta* = argmin J_R (convex): every segment's closed-form stationary point and every knot are compared.
    Left: eta* = argmax J_L over the observed rewards (J_L is convex between them). ``alpha = 1`` returns
    min r (right) or max r (left), where g = r - eta and the tilt is the expected-reward tilt exp(r / gamma).

    Args:
        rewards: shape (N,); NaN/inf entries and entries with ``valid`` False are excluded and counted.
        side: ``"right"`` or ``"left"``.
        alpha: tail mass in (0, 1].
        kl_weight: gamma > 0.
        valid: optional shape (N,) boolean mask.
    """
    side, alpha, kl_weight = _check_side(side), _check_alpha(alpha), _check_kl_weight(kl_weight)
    r = _as_float64(rewards, "rewards")
    keep = np.isfinite(r) if valid is None else np.isfinite(r) & _as_mask(valid, r.size)
    r = r[keep]
    if r.size == 0:
        raise ValueError("rewards: no valid finite reward in the bank")
    u_raw, counts = np.unique(r, return_counts=True)
    shift = float(u_raw[-1])  # J is translation-equivariant; shifting keeps exponents near zero
    u = u_raw - shift
    if side == "right":
        knot, root = (0, math.nan) if alpha == 1.0 else _solve_right(u, counts, alpha, kl_weight)
        # A knot is reported exactly as observed, so that the comparisons r > eta below are exact.
        eta = float(u_raw[knot]) if knot is not None else root + shift
        beyond = r > eta
    else:
        eta = float(u_raw[-1]) if alpha == 1.0 else float(u_raw[_solve_left(u, counts, alpha, kl_weight)])
        beyond = r < eta
    log_w = _log_tilt(r, eta, side, alpha * kl_weight)
    log_norm = _logsumexp(log_w)
    weights = np.exp(log_w - log_norm)
    return Threshold(
        eta=eta,
        value=threshold_objective(eta, r, side=side, alpha=alpha, kl_weight=kl_weight),
        tail_mass=float(weights[beyond].sum()),
        ess=float(math.exp(2.0 * log_norm - _logsumexp(2.0 * log_w))),
        active_fraction=float(beyond.mean()),
        side=side,
        alpha=alpha,
        kl_weight=kl_weight,
        n_valid=int(r.size),
        n_invalid=int(keep.size - r.size),
    )
