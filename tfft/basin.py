"""The left side's basin (DESIGN §3): where refinement of a left-tail threshold may move.

J_L is not concave: its tail mass m is not monotone in eta, and every local maximum and minimum of J_L is a
crossing m(eta) = alpha. :func:`left_basin` bounds refinement to the basin of the bank's eta* on J_L (the interval
around eta* bounded by the nearest local minima of J_L on the bank's rewards, :func:`left_objective_at_knots`) and
reports the rival local maxima beyond it, with a warning when a rival is within a few standard errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfft.bracket import _bank, _check_alpha, _check_positive, _check_z

__all__ = ["Basin", "Peak", "left_basin", "left_objective_at_knots"]


def left_objective_at_knots(rewards: Any, *, alpha: float, kl_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """J_L on every sorted unique reward u_1 < ... < u_K of the bank, in O(N log N).

        J_L(u_j) = u_j + gamma log( (1/N) [ #{r >= u_j} + sum_{r < u_j} exp((r - u_j) / (alpha gamma)) ] ),

    the second sum from a prefix log-sum-exp (the rewards are shifted by max r first, J being translation-
    equivariant). J_L is convex between knots, so its global maximum over the bank is the largest of these.

    Returns:
        (knots, values), both shape (K,).
    """
    alpha, kl_weight = _check_alpha(alpha), _check_positive(kl_weight, "kl_weight")
    u, counts = np.unique(_bank(rewards), return_counts=True)
    scale, shift = alpha * kl_weight, float(u[-1])
    v = u - shift
    prefix = np.logaddexp.accumulate(np.log(counts) + v / scale)
    log_below = np.concatenate(([-np.inf], prefix[:-1]))  # log sum exp(v_r / scale) over r < u_j
    n_at_or_above = counts.sum() - np.cumsum(counts) + counts
    log_mean = np.logaddexp(np.log(n_at_or_above), log_below - v / scale) - math.log(counts.sum())
    return u, u + kl_weight * log_mean


@dataclass(frozen=True)
class Peak:
    """A local maximum of the bank's J_L outside the basin: its eta, J_L(eta), and the standard error of
    J_L(eta*) - J_L(eta) over banks of the same size (delta method, :func:`left_basin`)."""

    eta: float
    value: float
    gap_se: float


@dataclass(frozen=True)
class Basin:
    """The basin of the bank's eta* = argmax J_L: eta* and J_L(eta*), the nearest local minima of J_L on either
    side (lo, hi; infinite where J_L keeps falling to the end of the bank), the highest peak beyond each of them,
    and warnings about competitive rivals."""

    eta: float
    value: float
    lo: float
    hi: float
    rivals: tuple[Peak, ...] = ()
    warnings: tuple[str, ...] = ()


def _valley(values: np.ndarray, prominence: float) -> int | None:
    """Index of the first local minimum of ``values`` (ordered away from the peak at index 0) after which they
    rise by more than ``prominence``; None if they never do."""
    rise = values - np.minimum.accumulate(values)
    risen = np.flatnonzero(rise > prominence)
    if risen.size == 0:
        return None
    return int(np.argmin(values[: risen[0]]))


def _gap_se(r: np.ndarray, a: float, b: float, alpha: float, kl_weight: float) -> float:
    """SE of J_L(a) - J_L(b) estimated on the bank ``r`` (delta method):

        Var ≈ gamma^2 Var_q( e_a / E e_a - e_b / E e_b ) / N,   e_eta = exp(-(eta - r)_+ / (alpha gamma)).
    """
    scale = alpha * kl_weight
    e_a, e_b = np.exp(-np.maximum(a - r, 0.0) / scale), np.exp(-np.maximum(b - r, 0.0) / scale)
    return float(kl_weight * np.std(e_a / e_a.mean() - e_b / e_b.mean()) / math.sqrt(r.size))


def left_basin(
    rewards: Any, *, alpha: float, kl_weight: float, z: float = 2.0, prominence: float = 0.0
) -> Basin:
    """The basin of the bank's eta* on J_L, and the rival local maxima beyond it (DESIGN §3, left side).

    With J_j = J_L(u_j) on the sorted unique rewards (:func:`left_objective_at_knots`) and j* = argmax J_j,
    walk away from j* on each side; the bound is the knot of the running minimum at the first point where J
    has risen more than ``prominence`` above it (a neighbouring local minimum of J_L; the rise is a rival
    peak). Where J never rises again the basin is open (J_L = eta below min r and falls with slope 1 - 1/alpha
    above max r: no maximum lies beyond the bank).

    The highest knot beyond each bound is reported as a rival Peak; a rival with
    J_L(eta*) - J_L(rival) <= z SE (SE from :func:`_gap_se`) gives a warning: a fresh bank of the same size
    could put eta* in the rival's mode, so the refined threshold is only the optimum within the chosen mode.
    ``prominence`` (reward units, >= 0) ignores shallower dips; a floor of 1e-12 (1 + |J*|) absorbs rounding.
    """
    alpha, kl_weight, z = _check_alpha(alpha), _check_positive(kl_weight, "kl_weight"), _check_z(z)
    if not (math.isfinite(prominence) and prominence >= 0.0):
        raise ValueError(f"prominence must be finite and >= 0, got {prominence}")
    r = _bank(rewards)
    u, values = left_objective_at_knots(r, alpha=alpha, kl_weight=kl_weight)
    best = int(np.argmax(values))
    eta, value = float(u[best]), float(values[best])
    prominence = max(prominence, 1e-12 * (1.0 + abs(value)))
    bounds, rivals, warnings = [-math.inf, math.inf], [], []
    for end, order in ((0, np.arange(best, -1, -1)), (1, np.arange(best, u.size))):  # outward: left, right
        valley = _valley(values[order], prominence)
        if valley is None:
            continue
        bounds[end] = float(u[order[valley]])
        beyond = order[valley + 1 :]
        top = int(beyond[np.argmax(values[beyond])])
        rival = Peak(float(u[top]), float(values[top]), _gap_se(r, eta, float(u[top]), alpha, kl_weight))
        rivals.append(rival)
        if value - rival.value <= z * rival.gap_se:
            warnings.append(
                f"J_L has a competitive local maximum at eta {rival.eta:.4g} (J {rival.value:.4g}) besides the "
                f"bank's eta* {eta:.4g} (J {value:.4g}): the gap {value - rival.value:.3g} is within {z:g} "
                f"standard errors (SE {rival.gap_se:.3g}) for a bank of {r.size}, so another bank may choose the "
                f"other mode; refinement stays within ({bounds[0]:.4g}, {bounds[1]:.4g})"
            )
    return Basin(eta, value, bounds[0], bounds[1], tuple(rivals), tuple(warnings))
