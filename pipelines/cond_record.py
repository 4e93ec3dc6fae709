"""The conditional parts of ``tfft run``: the weighted solver's per-condition tilt, the guard's baseline, and the
summary's ``per_condition`` blocks with their MLflow metrics (the thresholds per condition are solved by
`pipelines.stages.threshold.solve_thresholds`).

With C conditions the target is one tilt per condition, p*_c ∝ q_c exp(g_c / gamma) with g_c at eta*_c
(``objective.per_condition``, the default) or at one pooled eta* (false); its pooled law is the mixture
(1/C) sum_c p*_c, so the pooled target statistics weight each condition's bank rows by their own normalised tilt
times 1/C (`tfft.objective.Tilt.weights` with ``cond``). Base and fine-tuned banks hold the same number of samples
per condition, so their pooled statistics are the plain ones of the whole bank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.bankio import Bank
from pipelines.conditions import conditions_of, metric_prefix
from pipelines.schema import Config
from pipelines.summary import flatten_interval, flatten_stats
from tfft.invalid import tilt_rewards
from tfft.objective import Tilt
from tfft.tail import Threshold
from tfft.target import summarize

__all__ = ["tilt_by_condition", "base_objective", "conditional_record"]


def tilt_by_condition(bank: Bank, tilt: Tilt, invalid_reward: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The weighted solver's tilt weights (N,) (each condition's rows sum to 1/C) and its rows (N,) bool
    (`tfft.invalid.tilt_rewards` per condition, rows with a finite x)."""
    n_conditions = len(bank.conditions or [])
    reward, rows = np.full(len(bank), np.nan), np.zeros(len(bank), dtype=bool)
    for c in range(n_conditions):
        at = np.flatnonzero(bank.cond == c)
        reward[at], rows[at] = tilt_rewards(bank.reward[at], bank.valid[at], invalid_reward, tilt.eta_for(c))
    rows &= np.isfinite(bank.x).all(axis=1)
    return tilt.weights(np.where(rows, reward, np.nan), rows, bank.cond, n_conditions), rows


def base_objective(bank: Bank, tilt: Tilt) -> float:
    """E_q[g] over the bank's valid rows, each at its condition's threshold."""
    valid = bank.valid
    g = tilt.pseudo_reward(bank.reward[valid], bank.cond[valid])
    return float(np.mean(g)) if g.size else float("nan")


def _stats(summary: Any, n_valid: int) -> dict[str, Any]:
    out = summary.to_dict()
    out["n_valid"] = n_valid
    return out


def conditional_record(
    cfg: Config, base_bank: Bank, final_bank: Bank, thresholds: list[Threshold] | None,
    pooled: Threshold | None, tilt: Tilt,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(per_condition blocks keyed by str(value), the pooled target's statistics, MLflow metrics).

    Each block: ``threshold`` (its own eta*_c, or the pooled threshold's record), ``base``, ``finetuned``,
    ``target`` (the schema of the pooled blocks) and ``target_interval`` (bootstrap, `tfft.interval.target_interval`).
    """
    invalid_reward = cfg.objective.invalid_reward
    values = conditions_of(cfg)
    base_r, base_v = base_bank.scored(invalid_reward)
    blocks: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for c, value in enumerate(values):
        b, f = base_bank.of_condition(c), final_bank.of_condition(c)
        br, bv = b.scored(invalid_reward)
        fr, fv = f.scored(invalid_reward)
        own = tilt.at(c)
        threshold = thresholds[c] if thresholds is not None else pooled
        block = {
            "threshold": None if threshold is None else threshold.to_dict(),
            "base": _stats(summarize(br, valid=bv), b.n_valid),
            "finetuned": _stats(summarize(fr, valid=fv), f.n_valid),
            "target": _stats(summarize(br, valid=bv, weights=own.weights(br, valid=bv)), b.n_valid),
            "target_interval": own.target_interval(br, valid=bv, seed=cfg.seed).to_dict(),
        }
        blocks[str(value)] = block
        prefix = metric_prefix(value)
        for name in ("base", "finetuned", "target"):
            metrics.update(flatten_stats(f"{prefix}/{name}", block[name]))
        metrics.update(flatten_interval(f"{prefix}/target", block["target_interval"]))
        if threshold is not None:
            metrics.update({f"{prefix}/threshold.{k}": float(v) for k, v in threshold.to_dict().items()})
    weights = tilt.weights(base_r, base_v, base_bank.cond, len(values))
    target = _stats(summarize(base_r, valid=base_v, weights=weights), base_bank.n_valid)
    return blocks, target, metrics

