"""The terms' robust results in :meth:`rewards.compose.WeightedSum.evaluate_detailed`: checked, failed, first reasons.

Each term gives a :class:`rewards.robust.RobustResult` over the same n samples: :func:`checked_result` makes
sure it is one of n samples, :func:`failed_result` stands for a term whose evaluation raised as a whole, and
:func:`first_reasons` turns the terms' (n,) validity masks and reasons into the composite's reasons (the
first failing term's, in term order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewards.robust import RobustResult

__all__ = ["failed_result", "checked_result", "first_reasons"]


def failed_result(n: int, seconds: float) -> RobustResult:
    """n samples of a term whose evaluation raised: all invalid, reason 'exception'."""
    return RobustResult(
        rewards=np.full(n, np.nan), valid=np.zeros(n, dtype=bool), errors=["exception"] * n,
        attempts=np.ones(n, dtype=np.int64), seconds=np.full(n, seconds / max(n, 1)), n_calls=1,
    )


def checked_result(res: Any, n: int, name: str) -> RobustResult:
    """A term's result, checked for n samples; ValueError when it is not one."""
    if not isinstance(res, RobustResult):
        raise ValueError(f"term {name!r}: evaluate_detailed returned {type(res).__name__}, not a RobustResult")
    for field in ("rewards", "valid", "attempts", "seconds"):
        if np.shape(getattr(res, field)) != (n,):
            raise ValueError(f"term {name!r}: {field} of shape {np.shape(getattr(res, field))} for {n} samples")
    if len(res.errors) != n:
        raise ValueError(f"term {name!r}: {len(res.errors)} errors for {n} samples")
    return res


def first_reasons(valids: list[np.ndarray], reasons: list[list[str]], total_finite: np.ndarray) -> list[str]:
    """Per sample: '' when every term is valid and the sum finite, else the first failing term's reason.

    ``valids``: one (n,) bool mask per term; ``reasons``: one list of n reasons per term; ``total_finite``: (n,)
    bool, whether the weighted sum is finite.
    """
    n = len(total_finite)
    out = [""] * n
    for i in range(n):
        for valid, reason in zip(valids, reasons):
            if not valid[i]:
                out[i] = reason[i] or "nan"
                break
        else:
            if not total_finite[i]:
                out[i] = "nan"
    return out
