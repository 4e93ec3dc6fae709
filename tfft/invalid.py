"""What a failed sample counts as: excluded, or a fixed reward (``objective.invalid_reward``).

A sample whose reward could not be computed (the simulator crashed, timed out, returned NaN) is *invalid*.
Two rules:

- **exclude** (``value`` None): statistics, the threshold and the tilt use the valid samples only. The tail
  statistics then describe the model *given that the reward succeeded*. Right for the right tail when
  failures are not good outcomes and are rare; wrong for reliability, where a crash is among the worst
  outcomes: excluding it makes the left tail look better than the truth.
- **assign** (``value`` a number c): every invalid sample takes reward c, and every sample counts. With c
  below the valid rewards the failures sit in the left tail; the weighted solver's tilt then moves mass
  away from the failure region. Adjoint matching gives invalid samples no gradient under either rule.

What the fine-tuning objective E[g] - gamma KL sees of a failure (:func:`tilt_rewards`): under 'assign',
g(c); under 'exclude', g = 0, i.e. a failure is neutral, neither in the tail nor rewarded, as it is for adjoint
matching (no gradient). So under 'exclude' the weighted solver keeps failed samples at their base weight
relative to the untilted samples, and only a penalty moves mass out of a failure region.

When any sample failed, :func:`tail_both_ways` reports the left-tail statistic under both rules. Under
exclusion there is no value to assign; the comparison uses the smallest valid reward (``value_used``), the
most favourable penalty that still ranks a failure at least as bad as every observed outcome, so the
reported number is an upper bound on the left CVaR under any penalty below it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tfft.tail import cvar

__all__ = ["assign_invalid", "InvalidRule", "tail_both_ways", "TailBothWays", "tilt_rewards"]


@dataclass(frozen=True)
class InvalidRule:
    """The rule in force and how many samples it touched.

    Attributes:
        rule: 'exclude' or 'assign'.
        value: the assigned reward (None under 'exclude').
        n: samples in the bank; n_invalid: samples whose reward failed; invalid_fraction = n_invalid / n.
    """

    rule: str
    value: float | None
    n: int
    n_invalid: int
    invalid_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assign_invalid(
    reward: np.ndarray, valid: np.ndarray, value: float | None
) -> tuple[np.ndarray, np.ndarray, InvalidRule]:
    """Rewards and mask under the rule: ``value`` None excludes invalid samples, a number replaces their reward.

    Args:
        reward: (n,) rewards, anything where invalid.
        valid: (n,) bool.
        value: the reward an invalid sample takes, or None.

    Returns:
        (reward (n,) float64, valid (n,) bool, the rule record). Under 'assign' every entry of the mask is
        True and invalid rows hold ``value``; under 'exclude' both arrays are returned unchanged (as copies).
    """
    reward = np.asarray(reward, dtype=np.float64).reshape(-1)
    valid = np.asarray(valid, dtype=bool).reshape(-1)
    if reward.shape != valid.shape:
        raise ValueError(f"reward {reward.shape} and valid {valid.shape} must have the same shape")
    n, n_invalid = int(valid.size), int((~valid).sum())
    fraction = n_invalid / n if n else 0.0
    if value is None:
        return reward.copy(), valid.copy(), InvalidRule("exclude", None, n, n_invalid, fraction)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the invalid reward must be a finite number, got {value!r}")
    out = np.where(valid, reward, value)
    return out, np.ones_like(valid), InvalidRule("assign", value, n, n_invalid, fraction)


@dataclass(frozen=True)
class TailBothWays:
    """Left CVaR at each level with failures excluded and with failures at ``value_used``.

    Attributes:
        excluded, assigned: {level (str): left CVaR} under each rule (NaN when nothing is left to average).
        value_used: the reward failures took in ``assigned`` (the configured value, or the smallest valid
            reward under the exclude rule).
        invalid_fraction: as in :class:`InvalidRule`.
    """

    excluded: dict[str, float]
    assigned: dict[str, float]
    value_used: float
    invalid_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tail_both_ways(
    reward: np.ndarray, valid: np.ndarray, value: float | None, levels: tuple[float, ...] = (0.05, 0.1, 0.2)
) -> TailBothWays | None:
    """The left tail under both rules (None when every sample is valid, or none is).

    ``value`` is the configured invalid reward, or None (exclude): then failures are placed at the smallest
    valid reward for the comparison (see the module doc).
    """
    reward = np.asarray(reward, dtype=np.float64).reshape(-1)
    valid = np.asarray(valid, dtype=bool).reshape(-1)
    if valid.all() or not valid.any():
        return None
    used = float(reward[valid].min()) if value is None else float(value)
    kept = reward[valid]
    filled = np.where(valid, reward, used)
    return TailBothWays(
        excluded={f"{a:g}": float(cvar(kept, side="left", alpha=a)) for a in levels},
        assigned={f"{a:g}": float(cvar(filled, side="left", alpha=a)) for a in levels},
        value_used=used,
        invalid_fraction=float((~valid).mean()),
    )


def tilt_rewards(
    reward: np.ndarray, valid: np.ndarray, value: float | None, eta: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The rewards the weighted solver tilts by, and the rows it regresses onto.

    Args:
        reward, valid: (n,) the bank's rewards and mask.
        value: ``objective.invalid_reward`` (None: exclude).
        eta: the threshold of a CVaR objective, None for the mean objective.

    Returns:
        (reward (n,), rows (n,) bool). Under 'assign' every row, failures at ``value``. Under 'exclude' with a
        threshold, every row, failures at eta, where the pseudo-reward is 0 on either side (neutral). Under
        'exclude' for the mean objective (no neutral reward: g = r) only the valid rows.
    """
    reward = np.asarray(reward, dtype=np.float64).reshape(-1)
    valid = np.asarray(valid, dtype=bool).reshape(-1)
    if value is not None:
        filled, rows, _ = assign_invalid(reward, valid, value)
        return filled, rows
    if eta is None:
        return np.where(valid, reward, np.nan), valid.copy()
    return np.where(valid, reward, float(eta)), np.ones_like(valid)
