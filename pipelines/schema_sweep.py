"""The ``sweep:`` section of a sweep config (``tfft sweep``), declared, defaulted and checked like the run config's
sections (`pipelines.schema`): OmegaConf merges the YAML section and ``sweep.*`` overrides over these dataclasses,
so an unknown key, a value of the wrong type or a choice outside its ``Literal`` is one error naming
``sweep.<key>``, and :func:`check_sweep` checks the ranges. ``parameters`` stays free-form here (keys of the run config, each a domain);
`pipelines.sweep.section` turns it into typed domains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = ["SchedulerSection", "SweepSection", "SweepFile", "check_sweep"]


@dataclass
class SchedulerSection:
    """``sweep.scheduler``: ASHA early stopping on a training metric reported every ``finetune.log_every`` steps.

    kind: asha (the only one). metric: the reported metric it compares (`pipelines.sweep.scheduler.TRAIN_METRICS`).
    mode: max | min. grace_period: reports a trial makes before it can be stopped (>= 1). reduction_factor: the
    fraction 1/reduction_factor of trials that go on at each rung (>= 2).
    """

    kind: Literal["asha"] = "asha"
    metric: str = "active_fraction"
    mode: Literal["max", "min"] = "max"
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass
class SweepSection:
    """``sweep``: ``parameters`` (run-config keys -> ``{grid|choice: [...]}`` or ``{uniform|loguniform: [lo, hi]}``,
    nested or dotted), ``num_samples`` (repeats of the grid, each with fresh random draws; >= 1), ``seed`` (of those
    draws; >= 0), ``max_concurrent_trials`` (0: derived from the cluster) and ``scheduler`` (null: none)."""

    parameters: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    seed: int = 0
    max_concurrent_trials: int = 0
    scheduler: Optional[SchedulerSection] = None


@dataclass
class SweepFile:
    """What OmegaConf merges a sweep config's ``sweep:`` section into (so that errors name ``sweep.<key>``)."""

    sweep: SweepSection = field(default_factory=SweepSection)


def check_sweep(section: SweepSection) -> None:
    """The ranges and choices of the ``sweep`` section; a ConfigError naming the key."""
    from pipelines.config import require  # that module imports the run schema, which this one sits beside

    for key, minimum in (("num_samples", 1), ("seed", 0), ("max_concurrent_trials", 0)):
        value = getattr(section, key)
        require(value >= minimum, f"sweep.{key}", f"must be an integer >= {minimum}, got {value!r}")
    sched = section.scheduler
    if sched is None:
        return
    require(sched.grace_period >= 1, "sweep.scheduler.grace_period",
            f"must be an integer >= 1, got {sched.grace_period!r}")
    require(sched.reduction_factor >= 2, "sweep.scheduler.reduction_factor",
            f"must be an integer >= 2, got {sched.reduction_factor!r}")
