"""What one fine-tuning run needs, as one typed value: :class:`FinetuneJob`.

The train stage (`pipelines.stages.train`) builds the job; the driver (`pipelines.trainer.run_finetune`) hands it
unchanged to every worker (Ray Train's ``train_loop_config={"job": job}``, or the local loop), and the worker
(`pipelines.finetune.run_loop`, `pipelines.train_build`) reads its fields. It is frozen and picklable: the
``finetune`` section as loaded (``settings``), the objective as a `tfft.objective.Tilt`, the base model, and what
the stage derived from the config and the bank. Which solver runs is decided by what the job carries: the bank's
tilt-weighted rows (``weighted``: flow matching on them, DESIGN §7) or none (adjoint matching, DESIGN §6).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pipelines.guard import Guard
from pipelines.lora import LoraSettings
from pipelines.schema_finetune import FinetuneConfig
from tfft.objective import Tilt

__all__ = ["WeightedBank", "FinetuneJob"]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightedBank:
    """The weighted solver's data: bank rows ``x`` (N, d), their frozen tilt weights ``weights`` (N,), summing to 1
    (w_i ∝ exp(g(x_i)/gamma)), and with conditions each row's condition index ``cond`` (N,)."""

    x: np.ndarray
    weights: np.ndarray
    cond: np.ndarray | None = None


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run.

    Attributes:
        settings: the config's ``finetune`` section (the loop's batch size, learning rate, solver settings, guard,
            logging and checkpoint cadence, workers and threads). Its ``solver`` is the config's word ("auto"
            included) and nothing reads it here: the job's :attr:`solver` is what runs.
        model_config, base_state: the base network (`pipelines.models.build_model`) and its weights.
        tilt: the objective; its pseudo-reward (each row at its condition's threshold) and KL weight.
        reward_target, reward_kwargs: the reward the workers load (its values and gradients).
        seed: the run's seed; step k of rank r draws from ``seed * 100003 + k * 1009 + r``.
        steps: the optimiser steps (``finetune.steps``, or refinement's ``threshold.refine_steps``).
        sde_steps: K of the training trajectories.
        weighted: the bank rows of the weighted solver; None: adjoint matching.
        conditions: the condition values of a conditional run (None: unconditional); every training trajectory
            draws its condition uniformly.
        init_state: warm start of the fully fine-tuned network (refinement); the base stays the base.
        lora: the adapters' shape (None: full fine-tuning); ``init_adapter`` (peft's format) warm-starts them.
        guard_baseline: the base model's objective E_q[g] for the guard (None: its first window).
        min_valid_fraction: the guard's validity floor for the training samples.
        mlflow: rank 0's MLflow logger arguments (`pipelines.tracking.TrackedRun.worker_args`; None: no logging).
        call: names this driver call in its checkpoints (default: a fresh token); steps of another call's
            checkpoint count as reused, a restarted worker group's (the same call) as run.
    """

    settings: FinetuneConfig
    model_config: dict[str, Any]
    base_state: State
    tilt: Tilt
    reward_target: str
    reward_kwargs: dict[str, Any]
    seed: int
    steps: int
    sde_steps: int
    weighted: WeightedBank | None = None
    conditions: tuple[Any, ...] | None = None
    init_state: State | None = None
    lora: LoraSettings | None = None
    init_adapter: State | None = None
    guard_baseline: float | None = None
    min_valid_fraction: float = 0.0
    mlflow: dict[str, Any] | None = None
    call: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.sde_steps < 1:
            raise ValueError(f"a fine-tuning job needs sde_steps >= 1, got {self.sde_steps}")
        if self.steps < 1:
            raise ValueError(f"a fine-tuning job needs steps >= 1, got {self.steps}")
        if self.lora is not None and self.init_state is not None:
            raise ValueError("a LoRA job warm-starts from init_adapter, not init_state")

    @property
    def solver(self) -> Literal["adjoint", "weighted"]:
        """The solver this job runs: weighted when it carries the bank's rows."""
        return "adjoint" if self.weighted is None else "weighted"

    @property
    def holds_out(self) -> bool:
        """Whether the solver holds bank rows out to check the model (`tfft.holdout`): the anchored weighted solver
        with ``finetune.holdout_fraction`` > 0."""
        return self.weighted is not None and self.settings.anchor and self.settings.holdout_fraction > 0

    def guard(self) -> Guard:
        """A fresh guard for this job (`pipelines.guard.Guard`). It follows ``holdout_gain`` from 0 with no
        margin when the solver holds rows out (L(base) - L(model) on the held-out rows: the base's own gain is
        0, and its standard error is wide), else ``finetune.guard_metric`` from :attr:`guard_baseline` with a
        margin of two standard errors."""
        s = self.settings
        if self.holds_out:
            metric, start, margin = "holdout_gain", 0.0, 0.0
        else:
            metric, start, margin = s.guard_metric, self.guard_baseline, 2.0
        return Guard(enabled=s.guard, metric=metric, min_valid_fraction=self.min_valid_fraction,
                     patience=s.guard_patience, baseline=start, margin=margin)

    @property
    def dim(self) -> int:
        """The network's flat sample dimension d."""
        return int(self.model_config["dim"])

    @property
    def threads(self) -> int:
        """Torch threads per worker: the CPUs it was given, at least 1."""
        return max(1, int(self.settings.cpus_per_worker))
