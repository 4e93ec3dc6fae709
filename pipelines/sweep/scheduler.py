"""A sweep's scheduling: the ASHA scheduler on the trials' training reports, the check of its metric against
what the trials' solvers report, and the callback that tells a trial stopped by the scheduler from an interrupted
one."""

from __future__ import annotations

import math
from typing import Any

from pipelines.config import ConfigError
from pipelines.sweep.spec import Sweep, TrialSpec

__all__ = ["TRAIN_METRICS", "check_scheduler", "asha_scheduler", "completed_callback"]

# What pipelines.finetune.run_loop reports every log_every steps (the last two with the adjoint solver only).
TRAIN_METRICS = ("loss", "valid_fraction", "invalid_count", "mean_reward", "active_fraction")


def check_scheduler(sweep: Sweep, plans: dict[str, Any]) -> None:
    """``sweep.scheduler.metric`` must be reported during fine-tuning by every trial's solver (``plans``: trial
    name -> its `pipelines.stages.preflight.RunPlan`)."""
    sched = sweep.sweep.scheduler
    if sched is None:
        return
    allowed = TRAIN_METRICS if all(p.solver == "adjoint" for p in plans.values()) else TRAIN_METRICS[:3]
    if sched.metric not in allowed:
        raise ConfigError(f"'sweep.scheduler.metric' must be one of {', '.join(allowed)} (reported during "
                          f"fine-tuning with these trials' solvers), got {sched.metric!r}")


def asha_scheduler(sweep: Sweep, trials: list[TrialSpec]) -> Any:
    """The ASHA scheduler of ``sweep.scheduler`` (None without one), on Tune's count of training reports.

    ``stop_last_trials=False``: a trial that reaches its last report must go on to evaluate and record.
    """
    s = sweep.sweep.scheduler
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    reports = max(math.ceil(t.config.finetune.steps / t.config.finetune.log_every) for t in trials)
    return ASHAScheduler(
        time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=max(reports, s.grace_period),
        grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False,
    )


def completed_callback() -> Any:
    """A Tune callback whose ``names`` are the trials Tune saw end normally."""
    from ray import tune

    class Completed(tune.Callback):
        """Names of the trials Tune saw end normally (finished, or stopped by the scheduler)."""

        def __init__(self) -> None:
            self.names: set[str] = set()

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.names.add(trial.config["trial"])

    return Completed()
