"""The threshold stage: eta* on the base bank's valid rewards (DESIGN §3) and the pseudo-reward's parameters.

The objective dict ``{"eta", "side", "alpha", "kl_weight"}`` is what every later stage reads: ``eta`` None for
``objective.kind: mean`` (the plain expected reward: side right, alpha 1), one float, or with conditions and
``objective.per_condition`` a list of eta*_c (`pipelines.cond_record.solve_thresholds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipelines import cond_record
from pipelines.bankio import Bank
from pipelines.conditions import conditions_of, metric_prefix, per_condition
from pipelines.schema import Config
from pipelines.tracking import TrackedRun
from tfft.tail import Threshold, solve_threshold

__all__ = ["ThresholdStage", "solve_objective", "objective_of"]


@dataclass(frozen=True)
class ThresholdStage:
    """eta* on the pooled bank (None for the mean objective, and per condition), and the objective dict."""

    threshold: Threshold | None
    objective: dict[str, Any]


def objective_of(cfg: Config, threshold: Threshold | None) -> dict[str, Any]:
    """The pseudo-reward's parameters: eta None means the plain expected reward (objective.kind=mean)."""
    if cfg.objective.kind == "mean" or threshold is None:
        return {"eta": None, "side": "right", "alpha": 1.0, "kl_weight": cfg.objective.kl_weight}
    return {
        "eta": threshold.eta,
        "side": cfg.objective.side,
        "alpha": cfg.objective.alpha,
        "kl_weight": cfg.objective.kl_weight,
    }


def solve_objective(
    cfg: Config, base_bank: Bank, *, run: TrackedRun | None = None, log: Callable[[str], None] = print
) -> ThresholdStage:
    """Threshold eta* on the bank's valid rewards (None for objective.kind=mean) and the pseudo-reward params;
    logs the thresholds to ``run`` (a `TrackedRun`, possibly disabled) when given.

    With conditions and ``objective.per_condition`` the thresholds are solved per condition, the stage's
    threshold is None and ``objective["eta"]`` is the list of eta*_c; otherwise one eta* on the pooled bank.
    """
    if cfg.objective.kind == "cvar" and per_condition(cfg):
        return _per_condition(cfg, base_bank, run, log)
    if cfg.objective.kind == "cvar":
        threshold = _pooled(cfg, base_bank, log)
        if run is not None:
            run.log_metrics({f"threshold.{k}": v for k, v in threshold.to_dict().items()})
        return ThresholdStage(threshold, objective_of(cfg, threshold))
    return ThresholdStage(None, objective_of(cfg, None))


def _per_condition(cfg: Config, bank: Bank, run: TrackedRun | None, log: Callable[[str], None]) -> ThresholdStage:
    thresholds = cond_record.solve_thresholds(cfg, bank, log)
    if run is not None:
        for value, th in zip(conditions_of(cfg), thresholds):
            run.log_metrics({f"{metric_prefix(value)}/threshold.{k}": v for k, v in th.to_dict().items()})
    objective = {**objective_of(cfg, None), "eta": [th.eta for th in thresholds], "side": cfg.objective.side,
                 "alpha": cfg.objective.alpha}
    return ThresholdStage(None, objective)


def _pooled(cfg: Config, bank: Bank, log: Callable[[str], None]) -> Threshold:
    """One eta* on every condition's rows, with its log line and the low-ESS warning."""
    reward, valid = bank.scored(cfg.objective.invalid_reward)
    threshold = solve_threshold(
        reward, side=cfg.objective.side, alpha=cfg.objective.alpha, kl_weight=cfg.objective.kl_weight, valid=valid,
    )
    n_failed = len(bank) - bank.n_valid
    rule = (f"{n_failed} invalid samples excluded" if cfg.objective.invalid_reward is None
            else f"{n_failed} invalid samples at reward {cfg.objective.invalid_reward:g}")
    log(
        f"[threshold] eta* = {threshold.eta:.4f}, J = {threshold.value:.4f}, ESS = {threshold.ess:.0f}, "
        f"active fraction = {threshold.active_fraction:.3f} ({rule})"
    )
    if threshold.ess < cfg.threshold.ess_warning:
        log(
            f"[threshold] WARNING: ESS {threshold.ess:.0f} < {cfg.threshold.ess_warning:.0f}: the bank sees the "
            "target poorly; target statistics are unreliable (raise bank.size or kl_weight)"
        )
    return threshold
