"""The values of a merged config checked before any work (:func:`validate`): ranges, cross-field rules, import
paths. Every problem raises `pipelines.config.ConfigError` with one line naming the offending key. Choices are the
schema's ``Literal`` types, which the merge itself enforces (``finetune.solver``, ``objective.side``, ...), and
``objective.*`` is checked next to its declaration (`pipelines.schema.check_objective`): a setting's default and
its check sit in one module."""

from __future__ import annotations

import math
from typing import Any

from pipelines.config import ConfigError, require as _require
from pipelines.schema import Config, FinetuneConfig, PretrainConfig, SamplerConfig, ServeConfig, check_objective
from pipelines.validation_model import check_model

__all__ = ["validate"]


def validate(cfg: Config, *, check_imports: bool = True) -> None:
    """Check every value's range and that import paths resolve. Raises :class:`ConfigError`."""
    from pipelines.conditions import check_conditions

    check_objective(cfg.objective)
    _check_serve(cfg.reward.serve)
    _check_screen(cfg)
    check_conditions(cfg, check_imports)
    _check_sampler(cfg.sampler)
    check_model(cfg, check_imports)
    _check_pretrain(cfg.pretrain)
    _check_bank(cfg)
    _check_finetune(cfg.finetune)
    _check_threshold(cfg)
    if check_imports:
        _check_imports(cfg)


def _check_serve(sv: ServeConfig) -> None:
    _require(bool(sv.name), "reward.serve.name", "must name the Serve application")
    _require(sv.num_replicas >= 1, "reward.serve.num_replicas", f"must be >= 1, got {sv.num_replicas}")
    _require(sv.max_replicas == 0 or 1 <= max(sv.min_replicas, 1) <= sv.max_replicas, "reward.serve.max_replicas",
             f"must be 0 (fixed num_replicas) or >= max(min_replicas, 1), got {sv.max_replicas}")
    _require(sv.num_cpus >= 0 and sv.num_gpus >= 0, "reward.serve.num_cpus",
             f"num_cpus and num_gpus must be >= 0, got {sv.num_cpus} and {sv.num_gpus}")
    _require(sv.max_ongoing_requests >= 1, "reward.serve.max_ongoing_requests",
             f"must be >= 1, got {sv.max_ongoing_requests}")
    _require(sv.timeout_s > 0, "reward.serve.timeout_s", f"must be > 0, got {sv.timeout_s}")


def _check_sampler(sampler: SamplerConfig) -> None:
    _require(sampler.steps >= 2, "sampler.steps", f"must be >= 2, got {sampler.steps}")


def _check_pretrain(pre: PretrainConfig) -> None:
    _require(pre.n_samples >= 1, "pretrain.n_samples", f"must be >= 1, got {pre.n_samples}")
    _require(pre.steps >= 0, "pretrain.steps", f"must be >= 0, got {pre.steps}")
    _require(pre.batch_size >= 1, "pretrain.batch_size", f"must be >= 1, got {pre.batch_size}")
    _require(pre.lr > 0, "pretrain.lr", f"must be > 0, got {pre.lr}")


def _check_bank(cfg: Config) -> None:
    _require(cfg.bank.size >= 2, "bank.size", f"must be >= 2, got {cfg.bank.size}")
    _require(cfg.bank.shard_size >= 1, "bank.shard_size", f"must be >= 1, got {cfg.bank.shard_size}")
    _require(cfg.bank.start_timeout_s >= 0, "bank.start_timeout_s", f"must be >= 0, got {cfg.bank.start_timeout_s}")
    _check_pool("bank.sampler", cfg.bank.sampler)
    _check_pool("bank.reward", cfg.bank.reward)
    rp = cfg.bank.reward
    _require(rp.call_size >= 0, "bank.reward.call_size", f"must be >= 0, got {rp.call_size}")
    _require(rp.max_in_flight >= 1, "bank.reward.max_in_flight", f"must be >= 1, got {rp.max_in_flight}")
    _require(rp.retries >= 0, "bank.reward.retries", f"must be >= 0, got {rp.retries}")
    _require(rp.backoff_s >= 0, "bank.reward.backoff_s", f"must be >= 0, got {rp.backoff_s}")
    _require(cfg.eval.size >= 2, "eval.size", f"must be >= 2, got {cfg.eval.size}")


def _check_finetune(ft: FinetuneConfig) -> None:
    _require(ft.steps >= 0, "finetune.steps", f"must be >= 0, got {ft.steps}")
    _require(ft.num_workers >= 1, "finetune.num_workers", f"must be >= 1, got {ft.num_workers}")
    _require(ft.batch_size >= ft.num_workers, "finetune.batch_size",
             f"must be >= finetune.num_workers ({ft.num_workers}), got {ft.batch_size}")
    _require(ft.lr > 0, "finetune.lr", f"must be > 0, got {ft.lr}")
    _require(ft.warmup_steps >= 0, "finetune.warmup_steps", f"must be >= 0, got {ft.warmup_steps}")
    _require(ft.time_power > 0, "finetune.time_power", f"must be > 0, got {ft.time_power}")
    _require(0 <= ft.holdout_fraction <= 0.5, "finetune.holdout_fraction",
             f"must be in [0, 0.5] (0: no held-out check), got {ft.holdout_fraction}")
    _require(ft.grad_clip > 0, "finetune.grad_clip", f"must be > 0, got {ft.grad_clip}")
    _require(ft.reward_grad_clip >= 0, "finetune.reward_grad_clip", f"must be >= 0, got {ft.reward_grad_clip}")
    _require(ft.sde_steps == 0 or ft.sde_steps >= 2, "finetune.sde_steps",
             f"must be 0 (= sampler.steps) or >= 2, got {ft.sde_steps}")
    _require(0 <= ft.clip_quantile <= 1, "finetune.clip_quantile", f"must be in [0, 1] (0: off), got {ft.clip_quantile}")
    _require(ft.clip_factor >= 1, "finetune.clip_factor", f"must be >= 1, got {ft.clip_factor}")
    _require(ft.oversample >= 1, "finetune.oversample", f"must be >= 1, got {ft.oversample}")
    _require(ft.loss_chunk >= 0, "finetune.loss_chunk", f"must be >= 0 (0: one loss over every chosen step), "
             f"got {ft.loss_chunk}")
    _require(ft.adjoint_chunk >= 0, "finetune.adjoint_chunk", f"must be >= 0 (0: every trajectory at once), "
             f"got {ft.adjoint_chunk}")
    _require(0 <= ft.guard_validity_drop <= 1, "finetune.guard_validity_drop",
             f"must be in [0, 1], got {ft.guard_validity_drop}")
    _require(0 <= ft.guard_eval_margin <= 10, "finetune.guard_eval_margin",
             f"must be in [0, 10] standard errors (0: any measured loss keeps the base), got {ft.guard_eval_margin}")
    _require(ft.guard_paired_size >= 0, "finetune.guard_paired_size",
             f"must be >= 0 samples (0: the check compares the final bank with the base bank), got {ft.guard_paired_size}")
    _require(ft.guard_patience >= 0, "finetune.guard_patience", f"must be >= 0 (0: never), got {ft.guard_patience}")
    _require(0 < ft.late_fraction <= 1, "finetune.late_fraction", f"must be in (0, 1], got {ft.late_fraction}")
    _require(ft.n_early >= 0, "finetune.n_early", f"must be >= 0, got {ft.n_early}")
    _require(ft.cpus_per_worker > 0, "finetune.cpus_per_worker", f"must be > 0, got {ft.cpus_per_worker}")
    _require(ft.log_every >= 1, "finetune.log_every", f"must be >= 1, got {ft.log_every}")
    _require(ft.checkpoint_every >= 1, "finetune.checkpoint_every", f"must be >= 1, got {ft.checkpoint_every}")
    _check_resources("finetune.resources_per_worker", ft.resources_per_worker)
    _require(ft.max_failures >= 0, "finetune.max_failures", f"must be >= 0, got {ft.max_failures}")
    _require(ft.poll_interval_s > 0, "finetune.poll_interval_s", f"must be > 0 seconds, got {ft.poll_interval_s}")
    _require(ft.backend == "ray" or ft.num_workers == 1, "finetune.backend",
             f"local runs one worker in this process: set 'finetune.num_workers' to 1 (got {ft.num_workers}) "
             "or use backend ray (DDP)")


def _check_threshold(cfg: Config) -> None:
    _require(cfg.threshold.ess_warning >= 0, "threshold.ess_warning", "must be >= 0")
    th = cfg.threshold
    _require(th.refine_rounds >= 0, "threshold.refine_rounds", f"must be >= 0, got {th.refine_rounds}")
    _require(th.refine_size >= 2, "threshold.refine_size", f"must be >= 2, got {th.refine_size}")
    _require(th.refine_steps >= 0, "threshold.refine_steps", f"must be >= 0, got {th.refine_steps}")
    if th.refine_rounds and cfg.objective.kind == "mean":
        raise ConfigError("'threshold.refine_rounds' needs objective.kind=cvar (the mean has no threshold)")


def _check_imports(cfg: Config) -> None:
    """``data.source``, ``reward.target`` (only imported when served) and ``reward.screen.target`` resolve."""
    from rewards.base import import_object, load_reward

    try:
        source = import_object(cfg.data.source)
    except ValueError as exc:
        raise ConfigError(f"'data.source': {exc}") from None
    _require(callable(source), "data.source", f"{cfg.data.source!r} is not callable")
    try:
        if cfg.reward.serve.enabled:  # built once, by the Serve application, never on the driver
            import_object(cfg.reward.target)
        else:
            load_reward(cfg.reward.target, cfg.reward.kwargs)
    except ValueError as exc:
        raise ConfigError(f"'reward.target': {exc}") from None
    if cfg.reward.screen.target:
        try:
            load_reward(cfg.reward.screen.target, cfg.reward.screen.kwargs)
        except ValueError as exc:
            raise ConfigError(f"'reward.screen.target': {exc}") from None


def _check_resources(key: str, resources: dict[str, float]) -> None:
    for name, amount in resources.items():
        _require(name not in ("CPU", "GPU"), key, f"names custom resources; set CPUs/GPUs with their own keys, got {name!r}")
        _require(isinstance(amount, (int, float)) and amount >= 0, f"{key}.{name}", f"must be a number >= 0, got {amount!r}")


def _check_pool(prefix: str, pool: Any) -> None:
    _require(pool.size >= 1, f"{prefix}.size", f"must be >= 1, got {pool.size}")
    _require(pool.num_cpus >= 0, f"{prefix}.num_cpus", f"must be >= 0, got {pool.num_cpus}")
    _require(pool.num_gpus >= 0, f"{prefix}.num_gpus", f"must be >= 0, got {pool.num_gpus}")
    _require(pool.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {pool.batch_size}")
    _check_resources(f"{prefix}.resources", pool.resources)
    if (pool.min_size is None) != (pool.max_size is None):
        raise ConfigError(f"'{prefix}.min_size' and '{prefix}.max_size' must be set together")
    if pool.min_size is not None:
        _require(
            1 <= pool.min_size <= pool.max_size,
            f"{prefix}.min_size",
            f"must satisfy 1 <= min_size <= max_size, got {pool.min_size} and {pool.max_size}",
        )


def _check_screen(cfg: Config) -> None:
    """``reward.screen``: ranges, and an objective that screening can serve (a tail, not the mean)."""
    sc = cfg.reward.screen
    _require(math.isfinite(sc.audit) and 0.0 < sc.audit <= 1.0, "reward.screen.audit", f"must be in (0, 1], got {sc.audit}")
    _require(sc.min_audit >= 1, "reward.screen.min_audit", f"must be >= 1, got {sc.min_audit}")
    _require(math.isfinite(sc.tolerance) and 0.0 < sc.tolerance < 1.0, "reward.screen.tolerance",
             f"must be in (0, 1), got {sc.tolerance}")
    _require(math.isfinite(sc.confidence) and 0.5 < sc.confidence < 1.0, "reward.screen.confidence",
             f"must be in (0.5, 1), got {sc.confidence}")
    _require(sc.batch_size >= 0, "reward.screen.batch_size", f"must be >= 0 (0: alpha * bank size / 4), got {sc.batch_size}")
    if not sc.target:
        return
    _require(cfg.objective.kind == "cvar", "reward.screen.target",
             "is set but objective.kind is 'mean': the mean needs every sample's reward, so there is nothing to "
             "screen out; use objective.kind=cvar or leave reward.screen.target empty")
    _require(cfg.objective.alpha < 1.0, "reward.screen.target",
             "is set but objective.alpha is 1 (the mean): every sample is in the tail; use alpha < 1 or no screen")
    _require(cfg.finetune.guard_paired_size == 0, "finetune.guard_paired_size",
             "is not supported with reward.screen (a screened bank scores only its tail and an audit); set it to 0")
