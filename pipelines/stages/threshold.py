"""The threshold stage: eta* on the base bank's valid rewards (DESIGN §3) and the objective as a `tfft.objective.Tilt`.

This module is where ``objective.side``, ``objective.alpha`` and ``objective.kl_weight`` become the run's
objective: :func:`tilt_of` builds the one `Tilt` that every later stage receives and passes along (its
computations are the Tilt's own). Its ``eta`` is None for ``objective.kind: mean`` (the plain expected reward:
side right, alpha 1), one float, or with conditions and ``objective.per_condition`` a tuple of eta*_c
(:func:`solve_thresholds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pipelines.bankio import Bank
from pipelines.conditions import conditions_of, metric_prefix, per_condition
from pipelines.schema import Config
from pipelines.tracking import TrackedRun
from tfft.objective import Tilt
from tfft.tail import Threshold, solve_threshold

__all__ = ["ThresholdStage", "solve_objective", "solve_thresholds", "tilt_of"]


@dataclass(frozen=True)
class ThresholdStage:
    """eta* on the pooled bank (None for the mean objective, and per condition), and the objective."""

    threshold: Threshold | None
    tilt: Tilt


def tilt_of(cfg: Config, eta: float | Sequence[float] | None = None) -> Tilt:
    """The run's objective at threshold ``eta`` (one, or one per condition): `Tilt.mean` for
    ``objective.kind: mean`` (``eta`` ignored), else the CVaR tilt of ``objective.side``/``alpha``/``kl_weight``."""
    obj = cfg.objective
    if obj.kind == "mean":
        return Tilt.mean(obj.kl_weight)
    return Tilt(eta, obj.side, obj.alpha, obj.kl_weight)


def solve_objective(
    cfg: Config, base_bank: Bank, *, run: TrackedRun | None = None, log: Callable[[str], None] = print
) -> ThresholdStage:
    """Threshold eta* on the bank's valid rewards (None for objective.kind=mean) and the objective's `Tilt`;
    logs the thresholds to ``run`` (a `TrackedRun`, possibly disabled) when given.

    With conditions and ``objective.per_condition`` the thresholds are solved per condition, the stage's
    threshold is None and the tilt's ``eta`` is the tuple of eta*_c; otherwise one eta* on the pooled bank.
    """
    if cfg.objective.kind == "mean":
        return ThresholdStage(None, tilt_of(cfg))
    if per_condition(cfg):
        thresholds = solve_thresholds(cfg, base_bank, log)
        if run is not None:
            for value, th in zip(conditions_of(cfg), thresholds):
                run.log_metrics({f"{metric_prefix(value)}/threshold.{k}": v for k, v in th.to_dict().items()})
        return ThresholdStage(None, tilt_of(cfg, [th.eta for th in thresholds]))
    threshold = _pooled(cfg, base_bank, log)
    if run is not None:
        run.log_metrics({f"threshold.{k}": v for k, v in threshold.to_dict().items()})
    return ThresholdStage(threshold, tilt_of(cfg, threshold.eta))


def _solve(cfg: Config, reward: Any, valid: Any) -> Threshold:
    """eta* of the config's objective on one bank's scored rewards (`tfft.tail.solve_threshold`)."""
    obj = cfg.objective
    return solve_threshold(reward, side=obj.side, alpha=obj.alpha, kl_weight=obj.kl_weight, valid=valid)


def solve_thresholds(cfg: Config, bank: Bank, log: Callable[[str], None] = print) -> list[Threshold]:
    """eta*_c on each condition's valid bank rows (DESIGN.md section 3, one solve per condition)."""
    out = []
    for c, value in enumerate(conditions_of(cfg)):
        reward, valid = bank.of_condition(c).scored(cfg.objective.invalid_reward)
        if int(valid.sum()) < 2:
            raise RuntimeError(f"condition {value!r} has {int(valid.sum())} valid bank samples; its threshold needs 2")
        th = _solve(cfg, reward, valid)
        log(f"[threshold] condition {value!r}: eta* = {th.eta:.4f}, J = {th.value:.4f}, ESS = {th.ess:.0f}, "
            f"active fraction = {th.active_fraction:.3f}")
        if th.ess < cfg.threshold.ess_warning:
            log(f"[threshold] WARNING: condition {value!r}: ESS {th.ess:.0f} < {cfg.threshold.ess_warning:.0f}")
        out.append(th)
    return out


def _pooled(cfg: Config, bank: Bank, log: Callable[[str], None]) -> Threshold:
    """One eta* on every condition's rows, with its log line and the low-ESS warning."""
    reward, valid = bank.scored(cfg.objective.invalid_reward)
    threshold = _solve(cfg, reward, valid)
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
