"""The record stage: ``summary.json``'s dict, the run's final MLflow metrics, ``rewards.png`` and the reward's
own figures, from the base and final banks and the objective (a `tfft.objective.Tilt`).

Statistics (`tfft.target.summarize`) of the base and fine-tuned rewards and of the exact target (the base bank
tilted by w_i ∝ exp(g(x_i)/gamma), with its bootstrap interval); with conditions the per-condition blocks of
`pipelines.cond_record`; with a screen the audit's estimates (`pipelines.screen_stats`). A reward with terms
(``Reward.term_weights``) gets each term's statistics, one with ``Reward.describe`` its sample statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import cond_record
from pipelines.bankio import Bank
from pipelines.conditions import conditions_of
from pipelines.plots import plot_rewards
from pipelines.schema import Config
from pipelines.screen_stats import audit_statistics, flatten_screen
from pipelines.stages.preflight import sampler_record
from pipelines.stages.threshold import solve_thresholds
from pipelines.stages.train import checkpoint_record
from pipelines.summary import flatten_interval, flatten_invalid, flatten_stats, flatten_terms, invalid_record
from pipelines.summary import term_record
from pipelines.tracking import TrackedRun
from rewards.base import Reward, load_reward
from tfft.objective import Tilt
from tfft.tail import Threshold, cvar
from tfft.target import summarize

__all__ = ["record_summary"]

Scored = dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (rewards (n,), mask (n,)) under objective.invalid_reward


@dataclass(frozen=True)
class Statistics:
    """The summary's statistics blocks: base, fine-tuned, target (``TailSummary`` dicts), the target's bootstrap
    interval (None with conditions), the screen's additions, the per-condition blocks and their metrics."""

    base: dict[str, Any]
    finetuned: dict[str, Any]
    target: dict[str, Any]
    interval: dict[str, Any] | None
    screened: dict[str, Any]
    per_condition: dict[str, Any] | None
    condition_metrics: dict[str, float]


def record_summary(
    cfg: Config, out: Path, run: TrackedRun, base_bank: Bank, final_bank: Bank, threshold: Threshold | None,
    tilt: Tilt, solver: str, *, model_dir: Path | None = None,
) -> dict[str, Any]:
    """The run's summary dict; logs its metrics (at step ``finetune.steps``) and figures to ``run``.
    ``model_dir``: the directory whose checkpoint holds the final model (refinement's last round), whose guard
    record the summary reports (None: ``out``'s)."""
    banks = {"base": base_bank, "finetuned": final_bank}
    scored = {label: bank.scored(cfg.objective.invalid_reward) for label, bank in banks.items()}
    stats = _statistics(cfg, banks, scored, threshold, tilt)
    summary = _summary(cfg, out, banks, threshold, tilt, solver, stats)
    if model_dir is not None:
        summary["guard"] = checkpoint_record(model_dir).get("guard")
    reward = load_reward(cfg.reward.target, cfg.reward.kwargs)
    extras = _reward_record(reward, banks)
    summary.update(extras)
    run.log_metrics(_metrics(summary, stats, extras), step=cfg.finetune.steps)
    _plot(cfg, out, banks, scored, tilt, summary)
    run.log_artifact(out / "rewards.png")
    conds = {} if base_bank.cond is None else {"base_cond": _values(base_bank), "final_cond": _values(final_bank)}
    for path in reward.figures(out, base_bank.x, base_bank.valid, final_bank.x, final_bank.valid, **conds):
        run.log_artifact(path)
    return summary


def _statistics(cfg: Config, banks: dict[str, Bank], scored: Scored, threshold: Threshold | None,
                tilt: Tilt) -> Statistics:
    base_bank, final_bank = banks["base"], banks["finetuned"]
    (base_r, base_v), (final_r, final_v) = scored["base"], scored["finetuned"]
    base = _stats(summarize(base_r, valid=base_v), base_bank)
    final = _stats(summarize(final_r, valid=final_v), final_bank)
    if conditions_of(cfg):  # the pooled target is the mixture of the per-condition tilts; intervals are per condition
        thresholds = None if threshold is not None else _thresholds_of(cfg, base_bank, tilt)
        per_cond, target, metrics = cond_record.conditional_record(cfg, base_bank, final_bank, thresholds, threshold,
                                                                   tilt)
        return Statistics(base, final, target, None, {}, per_cond, metrics)
    target = _stats(tilt.target_summary(base_r, valid=base_v), base_bank)
    interval = tilt.target_interval(base_r, valid=base_v, seed=cfg.seed).to_dict()
    # screened banks (reward.screen): what the certified tail cannot give comes from the audit (in place)
    screened = audit_statistics({label: (banks[label], *scored[label]) for label in banks},
                                {"base": base, "finetuned": final, "target": target}, interval,
                                tilt=tilt, tolerance=cfg.reward.screen.tolerance, seed=cfg.seed)
    return Statistics(base, final, target, interval, screened, None, {})


def _summary(cfg: Config, out: Path, banks: dict[str, Bank], threshold: Threshold | None, tilt: Tilt,
             solver: str, stats: Statistics) -> dict[str, Any]:
    record = checkpoint_record(out)
    summary: dict[str, Any] = {
        "threshold": threshold.to_dict() if threshold is not None else None,
        "base": stats.base,
        "finetuned": stats.finetuned,
        "target": stats.target,
        "target_interval": stats.interval,
        "objective": {"kind": cfg.objective.kind, **tilt.to_dict()},
        "solver": solver,
        "finetune_seconds": record.get("seconds"),
        "finetune_loop_seconds": record.get("loop_seconds"),
        "guard": record.get("guard"),
        "sampler": sampler_record(cfg),
        "failures": {"base": banks["base"].accounting(), "final": banks["finetuned"].accounting()},
        "invalid": invalid_record(cfg.objective.invalid_reward,
                                  {label: (bank.reward, bank.valid) for label, bank in banks.items()}),
        **stats.screened,
    }
    if record.get("lora") is not None:
        summary["lora"] = record["lora"]
    if stats.per_condition is not None:
        summary["conditions"] = conditions_of(cfg)
        summary["per_condition"] = stats.per_condition
    return summary


def _reward_record(reward: Reward, banks: dict[str, Bank]) -> dict[str, Any]:
    """The summary's ``terms`` (a reward with terms: each term's statistics) and ``samples`` (``Reward.describe``
    per bank), each only when not empty."""
    extras: dict[str, Any] = {}
    terms = term_record({label: bank.terms for label, bank in banks.items()}, reward.term_weights)
    if terms:
        extras["terms"] = terms
    samples = {label: {k: float(v) for k, v in reward.describe(bank.x, bank.valid, **_cond_kwarg(bank)).items()}
               for label, bank in banks.items()}
    if samples["base"] or samples["finetuned"]:
        extras["samples"] = samples
    return extras


def _metrics(summary: dict[str, Any], stats: Statistics, extras: dict[str, Any]) -> dict[str, float]:
    """The summary as flat MLflow metrics (``base.mean``, ``target_lo.cvar_left_0.1``, ``bank_final.timeout``...)."""
    metrics: dict[str, float] = flatten_screen(stats.screened)
    metrics.update(stats.condition_metrics)
    for name in ("base", "finetuned", "target"):
        metrics.update(flatten_stats(name, summary[name]))
    if stats.interval is not None:
        metrics.update(flatten_interval("target", stats.interval))
    if "terms" in extras:
        metrics.update(flatten_terms(extras["terms"]))
    for label, values in extras.get("samples", {}).items():
        metrics.update({f"{label}.{k}": float(v) for k, v in values.items()})
    for label, counts in summary["failures"].items():
        metrics.update({f"bank_{label}.{k}": float(v) for k, v in counts.items()})
    metrics.update(flatten_invalid(summary["invalid"]))
    return metrics


def _plot(cfg: Config, out: Path, banks: dict[str, Bank], scored: Scored, tilt: Tilt,
          summary: dict[str, Any]) -> None:
    """``rewards.png``: base against fine-tuned rewards, eta* and each side's CVaR marked (the mean objective
    marks the right CVaR at 0.1)."""
    side, alpha = ("right", 0.1) if tilt.is_mean else (tilt.side, tilt.alpha)
    shown = {label: r[_evaluated(banks[label], v)] for label, (r, v) in scored.items()}
    own = {label: _own_cvar(summary[label], r[v], side, alpha) for label, (r, v) in scored.items()}
    plot_rewards(
        out / "rewards.png", shown["base"], shown["finetuned"],
        eta=None if isinstance(tilt.eta, tuple) else tilt.eta, side=side, alpha=alpha,
        cvar_base=own["base"], cvar_finetuned=own["finetuned"],
        title=f"{cfg.objective.kind} objective, side={side}, alpha={alpha:g}, kl_weight={tilt.kl_weight:g}",
    )


def _thresholds_of(cfg: Config, bank: Bank, tilt: Tilt) -> list[Threshold] | None:
    """The per-condition thresholds behind ``tilt.eta`` (a tuple), re-solved for their records; None when the
    objective has one threshold or none."""
    if not isinstance(tilt.eta, tuple):
        return None
    return solve_thresholds(cfg, bank, log=lambda _: None)


def _own_cvar(stats: dict[str, Any], rewards: np.ndarray, side: str, alpha: float) -> float:
    """CVaR_alpha from the recorded statistics (a screened bank's come from its certified tail or audit), computed
    from ``rewards`` only when alpha is not one of the recorded levels."""
    recorded = stats[f"cvar_{side}"].get(f"{alpha:g}")
    return recorded if recorded is not None else cvar(rewards, side=side, alpha=alpha)


def _evaluated(bank: Bank, valid: np.ndarray) -> np.ndarray:
    """The rows with a reward of their own (a screened bank's skipped rows hold a placeholder)."""
    return valid & bank.evaluated if bank.screened else valid


def _stats(summary: Any, bank: Bank) -> dict[str, Any]:
    """A `TailSummary` as a dict whose ``n_valid`` counts the samples whose reward succeeded (under an invalid
    reward every sample enters the statistics, but the row still says how many failed)."""
    out = summary.to_dict()
    out["n_valid"] = bank.n_valid
    return out


def _values(bank: Bank) -> list[Any]:
    """The condition value of every row of a conditional bank."""
    return [bank.conditions[int(i)] for i in bank.cond]


def _cond_kwarg(bank: Bank) -> dict[str, Any]:
    """``{"cond": values}`` for a conditional bank (a reward hook's keyword), else nothing."""
    return {} if bank.cond is None else {"cond": _values(bank)}
