"""What a run decides from its config alone, before Ray starts: the solver (a :class:`RunPlan`), the training
trajectories' step count, the samplers it records, and the warnings for settings that work but weaken the result.

``finetune.solver`` is read here and nowhere after: "auto" is resolved once, with the reward loaded, into
``RunPlan.solver``. Its one use is the train stage's (`pipelines.stages.train`): the fine-tuning job carries the
bank's tilt-weighted rows for the weighted solver and none for adjoint matching, and a worker builds the solver
the job carries the data for (`pipelines.train_build.build_solver`). ``summary.json`` records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from pipelines.config import ConfigError
from pipelines.raysession import check_address, check_local_capacity
from pipelines.schema import Config
from pipelines.schema_finetune import FinetuneConfig
from pipelines.serving import PROXY, served_differentiable
from rewards.base import load_reward

__all__ = ["RunPlan", "preflight", "resolve_plan", "training_steps", "sampler_record", "SamplerWarning",
           "sampler_warnings"]


@dataclass(frozen=True)
class RunPlan:
    """What preflight resolved from the config, for the later stages to read instead of the config.

    Attributes:
        solver: the fine-tuning solver, ``finetune.solver`` with "auto" resolved.
        differentiable: whether the loaded reward has gradients (what "auto" was resolved by).
        warnings: :func:`sampler_warnings` for that solver (logged by preflight, kept in ``summary.json``).
    """

    solver: Literal["adjoint", "weighted"]
    differentiable: bool
    warnings: tuple[SamplerWarning, ...] = ()


def preflight(cfg: Config, *, log: Callable[[str], None] = print) -> RunPlan:
    """The run's plan (:func:`resolve_plan`), with the Ray address and local capacity checked and the warnings
    of :func:`sampler_warnings` logged: config problems surface here, before any work."""
    plan = resolve_plan(cfg)
    check_address(cfg.ray)
    check_local_capacity(cfg.ray, cfg.finetune)
    for warning in plan.warnings:
        log(f"[config] WARNING: {warning}")
    return plan


def resolve_plan(cfg: Config) -> RunPlan:
    """The solver: adjoint when the reward has gradients, else weighted; an explicit choice is checked (adjoint
    needs gradients)."""
    if cfg.reward.serve.enabled and cfg.reward.target != PROXY:  # never build a served reward on the driver
        differentiable = served_differentiable(cfg)
    else:
        differentiable = bool(load_reward(cfg.reward.target, cfg.reward.kwargs).differentiable)
    solver = cfg.finetune.solver
    if solver == "auto":
        solver = "adjoint" if differentiable else "weighted"
    elif solver == "adjoint" and not differentiable:
        raise ConfigError(
            f"'finetune.solver' is 'adjoint' but reward {cfg.reward.target!r} has no gradients; "
            "use 'weighted' or 'auto'"
        )
    return RunPlan(solver, differentiable, tuple(sampler_warnings(cfg, solver)))


def training_steps(cfg: Config) -> int:
    """K of the fine-tuning trajectories: ``finetune.sde_steps``, or the bank sampler's ``sampler.steps`` (0)."""
    return int(cfg.finetune.sde_steps or cfg.sampler.steps)


def sampler_record(cfg: Config) -> dict[str, Any]:
    """The samplers of the run, for ``summary.json``: banks and evaluation vs fine-tuning trajectories."""
    record: dict[str, Any] = {"kind": cfg.sampler.kind, "steps": cfg.sampler.steps, "finetune_sde_steps": training_steps(cfg)}
    if cfg.sampler.kind == "ode":
        record["grid"] = cfg.sampler.grid
    record["same_as_finetune"] = cfg.sampler.kind == "sde" and cfg.sampler.steps == training_steps(cfg)
    return record


@dataclass(frozen=True)
class SamplerWarning:
    """A setting that works but weakens the result; ``str()`` is the logged text.

    ``kind``: ``two_samplers`` (numbers: ``sampler_kind``, ``sampler_steps``, ``finetune_sde_steps``) or
    ``thin_tail_signal`` (numbers: ``expected`` trajectories per update with gradient, ``batch_size``,
    ``oversample``, ``alpha``) or ``ignored_by_solver`` (numbers: ``solver``, ``keys``: the adjoint-only
    ``finetune`` settings moved off their defaults, which the weighted solver does not read).
    """

    kind: str
    numbers: Mapping[str, Any]

    def __str__(self) -> str:
        n = self.numbers
        if self.kind == "two_samplers":
            return (f"the banks use sampler {n['sampler_kind']} with {n['sampler_steps']} steps but fine-tuning uses "
                    f"the SDE with {n['finetune_sde_steps']} steps: target statistics describe the bank sampler's "
                    "tilt, so the fine-tuned vs target gap mixes two samplers")
        if self.kind == "thin_tail_signal":
            return (f"about {n['expected']:.0f} trajectories per update carry gradient (batch_size {n['batch_size']} x "
                    f"oversample {n['oversample']} x alpha {n['alpha']:g}); aim for 16 or more: raise "
                    "finetune.batch_size or finetune.oversample")
        if self.kind == "ignored_by_solver":
            keys = ", ".join(f"finetune.{k}" for k in n["keys"])
            return (f"the {n['solver']} solver trains on the bank's rows and ignores {keys} (adjoint matching "
                    "only): drop them, or set finetune.solver=adjoint")
        raise ValueError(f"unknown sampler warning kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """``summary.json["warnings"]``'s entry: ``kind``, the numbers and ``message`` (the logged text)."""
        return {"kind": self.kind, **self.numbers, "message": str(self)}


# The finetune settings that only adjoint matching reads (`pipelines.train_build.build_solver`).
_ADJOINT_ONLY = ("sde_steps", "late_fraction", "n_early", "normalize", "clip_quantile", "clip_factor", "oversample",
                "fast_path", "loss_chunk", "autocast", "reweight", "reward_grad_clip")


def sampler_warnings(cfg: Config, solver: str) -> list[SamplerWarning]:
    """Configurations that work but weaken the result or do nothing: two samplers, too little tail signal per
    update, adjoint-only settings under the weighted solver."""
    warnings = []
    if solver == "weighted":
        default = FinetuneConfig()
        moved = [k for k in _ADJOINT_ONLY if getattr(cfg.finetune, k) != getattr(default, k)]
        if moved:
            warnings.append(SamplerWarning("ignored_by_solver", {"solver": solver, "keys": moved}))
    if solver == "adjoint" and not sampler_record(cfg)["same_as_finetune"]:
        warnings.append(SamplerWarning("two_samplers", {
            "sampler_kind": cfg.sampler.kind, "sampler_steps": cfg.sampler.steps,
            "finetune_sde_steps": training_steps(cfg)}))
    if solver == "adjoint" and cfg.objective.kind == "cvar" and cfg.objective.alpha < 1:
        expected = cfg.finetune.batch_size * cfg.finetune.oversample * cfg.objective.alpha
        if expected < 16:
            warnings.append(SamplerWarning("thin_tail_signal", {
                "expected": expected, "batch_size": cfg.finetune.batch_size, "oversample": cfg.finetune.oversample,
                "alpha": cfg.objective.alpha}))
    return warnings
