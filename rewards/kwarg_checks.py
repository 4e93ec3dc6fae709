"""Checks of a reward's numeric constructor arguments, shared by the rewards that call out (`rewards.http`,
`rewards.simulator`): each error names the reward class and the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["as_int", "as_float"]


def as_int(owner: str, name: str, value: Any, low: int) -> int:
    """``value`` as an int when it is an integer (not a bool) >= ``low``; else ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def as_float(owner: str, name: str, value: Any, positive: bool) -> float:
    """``value`` as a float when it is a finite number (not a bool) >= 0, or > 0 with ``positive``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)
