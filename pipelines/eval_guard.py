"""The guard's last check, on the evaluation: the fine-tuned model must not end below its base on its own statistic.

The in-training guard (`pipelines.guard`) watches a running metric; the weighted solver has none, and a running
metric can miss what the evaluation then shows. After the evaluation bank, the objective's own statistic
(right-CVaR_alpha, left-CVaR_alpha, or the mean for the expected-reward objective) of the fine-tuned samples is
compared with the base bank's. Both are means of an influence function, so each has a standard error:

    right:  CVaR+ = mean(phi),  phi_i = q + (r_i - q)_+ / alpha,  q the (1 - alpha)-quantile;
    left:   CVaR- = mean(phi),  phi_i = q - (q - r_i)_+ / alpha,  q the alpha-quantile;
    mean:   phi_i = r_i;        se = std(phi) / sqrt(n).

The fine-tuned model is rejected when its statistic is below the base's by more than two standard errors of
the difference; the pipeline then keeps the base model (`pipelines.run`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["EvaluationCheck", "own_statistic", "check_evaluation"]


@dataclass(frozen=True)
class EvaluationCheck:
    """The objective's own statistic for base and fine-tuned samples, with standard errors, and the verdict."""

    statistic: str
    base: float
    base_se: float
    finetuned: float
    finetuned_se: float
    worse: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.statistic} of the fine-tuned samples {self.finetuned:.4g} +- {self.finetuned_se:.2g} "
                f"against the base model's {self.base:.4g} +- {self.base_se:.2g}")


def _name(objective: dict[str, Any]) -> str:
    if objective.get("eta") is None:
        return "mean"
    return f"{objective['side']}-CVaR({objective['alpha']:g})"


def own_statistic(rewards: np.ndarray, valid: np.ndarray, objective: dict[str, Any]) -> tuple[float, float]:
    """(statistic, standard error) of the objective's own statistic on the valid finite rewards (module docstring).

    Args:
        rewards: (n,) float; valid: (n,) bool.
        objective: ``eta`` (None: the mean), ``side``, ``alpha``.
    """
    r = np.asarray(rewards, dtype=np.float64)
    r = r[np.asarray(valid, dtype=bool) & np.isfinite(r)]
    if r.size < 2:
        return math.nan, math.nan
    if objective.get("eta") is None:
        phi = r
    else:
        alpha = float(objective["alpha"])
        if objective["side"] == "right":
            q = float(np.quantile(r, 1.0 - alpha))
            phi = q + np.maximum(r - q, 0.0) / alpha
        else:
            q = float(np.quantile(r, alpha))
            phi = q - np.maximum(q - r, 0.0) / alpha
    return float(phi.mean()), float(phi.std(ddof=1) / math.sqrt(phi.size))


def check_evaluation(
    base_rewards: np.ndarray,
    base_valid: np.ndarray,
    final_rewards: np.ndarray,
    final_valid: np.ndarray,
    objective: dict[str, Any],
) -> EvaluationCheck:
    """Compare the objective's own statistic of the fine-tuned samples with the base bank's (module docstring)."""
    base, base_se = own_statistic(base_rewards, base_valid, objective)
    final, final_se = own_statistic(final_rewards, final_valid, objective)
    margin = 2.0 * math.hypot(base_se, final_se)
    worse = bool(final < base - margin) if all(map(math.isfinite, (base, final, margin))) else False
    return EvaluationCheck(_name(objective), base, base_se, final, final_se, worse)
