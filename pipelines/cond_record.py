"""The conditional parts of ``tfft run``: thresholds per condition, the per-condition tilt, and the summary's
``per_condition`` blocks with their MLflow metrics.

With C conditions the target is one tilt per condition, p*_c ∝ q_c exp(g_c / gamma) with g_c at eta*_c
(``objective.per_condition``, the default) or at one pooled eta* (false); its pooled law is the mixture
(1/C) sum_c p*_c, so the pooled target statistics weight each condition's bank rows by their own normalised tilt
times 1/C (`tfft.conditions.per_condition_weights`). Base and fine-tuned banks hold the same number of samples per
condition, so their pooled statistics are the plain ones of the whole bank.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipelines.bankio import Bank
from pipelines.conditions import conditions_of, metric_prefix
from pipelines.schema import Config
from pipelines.summary import flatten_interval, flatten_stats
from tfft.conditions import per_condition_weights, row_values
from tfft.invalid import tilt_rewards
from tfft.tail import Threshold, solve_threshold
from tfft.target import pseudo_reward, summarize, target_interval, tilt_weights

__all__ = ["solve_thresholds", "condition_eta", "tilt_by_condition", "base_objective", "conditional_record"]


def solve_thresholds(cfg: Config, bank: Bank, log: Callable[[str], None] = print) -> list[Threshold]:
    """eta*_c on each condition's valid bank rows (DESIGN.md section 3, one solve per condition)."""
    out = []
    for c, value in enumerate(conditions_of(cfg)):
        reward, valid = bank.of_condition(c).scored(cfg.objective.invalid_reward)
        if int(valid.sum()) < 2:
            raise RuntimeError(f"condition {value!r} has {int(valid.sum())} valid bank samples; its threshold needs 2")
        th = solve_threshold(reward, side=cfg.objective.side, alpha=cfg.objective.alpha,
                             kl_weight=cfg.objective.kl_weight, valid=valid)
        log(f"[threshold] condition {value!r}: eta* = {th.eta:.4f}, J = {th.value:.4f}, ESS = {th.ess:.0f}, "
            f"active fraction = {th.active_fraction:.3f}")
        if th.ess < cfg.threshold.ess_warning:
            log(f"[threshold] WARNING: condition {value!r}: ESS {th.ess:.0f} < {cfg.threshold.ess_warning:.0f}")
        out.append(th)
    return out


def condition_eta(objective: dict[str, Any], c: int) -> float | None:
    """The threshold of condition c: ``objective["eta"]`` is None, one float, or a list per condition."""
    eta = objective["eta"]
    return eta[c] if isinstance(eta, (list, tuple)) else eta


def _tilt_args(objective: dict[str, Any], c: int) -> dict[str, Any]:
    return {"eta": condition_eta(objective, c), "side": objective["side"], "alpha": objective["alpha"],
            "kl_weight": objective["kl_weight"]}


def _condition_weights(reward: np.ndarray, valid: np.ndarray, cond: np.ndarray, objective: dict[str, Any],
                       n_conditions: int) -> np.ndarray:
    """Tilt weights of every row at its condition's eta, normalised per condition to sum 1/C, (N,)."""
    w = np.zeros(len(reward))
    for c in range(n_conditions):
        rows = np.flatnonzero((cond == c) & valid)
        if rows.size:
            w[rows] = tilt_weights(reward[rows], valid=np.ones(rows.size, dtype=bool), **_tilt_args(objective, c))
    return per_condition_weights(w, cond, n_conditions)


def tilt_by_condition(
    bank: Bank, objective: dict[str, Any], invalid_reward: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted solver's tilt weights (N,) (each condition's rows sum to 1/C) and its rows (N,) bool
    (`tfft.invalid.tilt_rewards` per condition, rows with a finite x)."""
    n_conditions = len(bank.conditions or [])
    reward, rows = np.full(len(bank), np.nan), np.zeros(len(bank), dtype=bool)
    for c in range(n_conditions):
        at = np.flatnonzero(bank.cond == c)
        eta = condition_eta(objective, c)
        reward[at], rows[at] = tilt_rewards(bank.reward[at], bank.valid[at], invalid_reward, eta)
    rows &= np.isfinite(bank.x).all(axis=1)
    return _condition_weights(np.where(rows, reward, np.nan), rows, bank.cond, objective, n_conditions), rows


def base_objective(bank: Bank, objective: dict[str, Any]) -> float:
    """E_q[g] over the bank's valid rows, each at its condition's threshold."""
    valid = bank.valid
    eta = row_values(objective["eta"], bank.cond[valid])
    g = pseudo_reward(bank.reward[valid], eta=eta, side=objective["side"], alpha=objective["alpha"])
    return float(np.mean(g)) if g.size else float("nan")


def _stats(summary: Any, n_valid: int) -> dict[str, Any]:
    out = summary.to_dict()
    out["n_valid"] = n_valid
    return out


def conditional_record(
    cfg: Config, base_bank: Bank, final_bank: Bank, thresholds: list[Threshold] | None,
    pooled: Threshold | None, objective: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(per_condition blocks keyed by str(value), the pooled target's statistics, MLflow metrics).

    Each block: ``threshold`` (its own eta*_c, or the pooled threshold's record), ``base``, ``finetuned``,
    ``target`` (the schema of the pooled blocks) and ``target_interval`` (bootstrap, `tfft.target.target_interval`).
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
        tilt = _tilt_args(objective, c)
        threshold = thresholds[c] if thresholds is not None else pooled
        block = {
            "threshold": None if threshold is None else threshold.to_dict(),
            "base": _stats(summarize(br, valid=bv), b.n_valid),
            "finetuned": _stats(summarize(fr, valid=fv), f.n_valid),
            "target": _stats(summarize(br, valid=bv, weights=tilt_weights(br, valid=bv, **tilt)), b.n_valid),
            "target_interval": target_interval(br, valid=bv, seed=cfg.seed, **tilt).to_dict(),
        }
        blocks[str(value)] = block
        prefix = metric_prefix(value)
        for name in ("base", "finetuned", "target"):
            metrics.update(flatten_stats(f"{prefix}/{name}", block[name]))
        metrics.update(flatten_interval(f"{prefix}/target", block["target_interval"]))
        if threshold is not None:
            metrics.update({f"{prefix}/threshold.{k}": float(v) for k, v in threshold.to_dict().items()})
    weights = _condition_weights(base_r, base_v, base_bank.cond, objective, len(values))
    target = _stats(summarize(base_r, valid=base_v, weights=weights), base_bank.n_valid)
    return blocks, target, metrics

