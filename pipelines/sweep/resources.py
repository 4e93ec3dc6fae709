"""Resources of a sweep's trials: how many run at once, and what each trial's Ray actors may ask for.

A trial is a Tune driver of 0.01 CPU (0 is refused) that runs, in turn, a Ray Train worker group and
the two Ray Data pools of its evaluation bank; both are placed outside the trial's own placement group.
Tune only counts the drivers, so the trials' worker groups and pools must fit the cluster by themselves.
"""

from __future__ import annotations

import copy
import math

from pipelines.config import ConfigError
from pipelines.schema import Config, PoolConfig

__all__ = ["DRIVER_CPUS", "plan_concurrency", "fit_trial"]

DRIVER_CPUS = 0.01


def _pool_cpus(pool: PoolConfig) -> float:
    return pool.num_cpus * (pool.max_size if pool.min_size is not None else pool.size)


def _peak_cpus(cfg: Config) -> float:
    """CPUs one trial holds at its busiest: the worker group while training, the two pools while evaluating."""
    train = cfg.finetune.num_workers * cfg.finetune.cpus_per_worker
    return max(train, _pool_cpus(cfg.bank.sampler) + _pool_cpus(cfg.bank.reward))


def plan_concurrency(resources: dict[str, float], configs: list[Config], requested: int = 0) -> int:
    """How many trials run at once: ``requested``, or as many as fit at the configured sizes (at least 1)."""
    if requested:
        return requested
    cpus = resources.get("CPU", 0.0)
    fit = max(1, math.floor(cpus / max(_peak_cpus(c) + DRIVER_CPUS for c in configs) + 1e-9))
    gpu_workers = max((c.finetune.num_workers for c in configs if c.finetune.use_gpu), default=0)
    if gpu_workers:
        fit = min(fit, max(1, math.floor(resources.get("GPU", 0.0) / gpu_workers)))
    return fit


def _floor(x: float) -> float:
    return math.floor(x * 1000) / 1000  # whole thousandths: Ray rounds resources to 1e-4


def fit_trial(cfg: Config, budget: float) -> Config:
    """A copy of ``cfg`` whose worker group and bank pools each fit in ``budget`` CPUs (fractions allowed).

    Without this, concurrent trials (or one trial on a small machine) ask for more CPUs than exist and wait
    forever; the fine-tuning and the pools run in turn, so each may use the whole budget.
    """
    cfg = copy.deepcopy(cfg)
    ft = cfg.finetune
    ft.cpus_per_worker = min(ft.cpus_per_worker, _floor(budget / ft.num_workers))
    pools = _pool_cpus(cfg.bank.sampler) + _pool_cpus(cfg.bank.reward)
    scale = min(1.0, budget / pools) if pools > 0 else 1.0
    for pool in (cfg.bank.sampler, cfg.bank.reward):
        pool.num_cpus = _floor(pool.num_cpus * scale) if pool.num_cpus > 0 and scale < 1 else pool.num_cpus
    if min(ft.cpus_per_worker, cfg.bank.sampler.num_cpus or 1, cfg.bank.reward.num_cpus or 1) <= 0:
        raise ConfigError(f"'sweep.max_concurrent_trials': {budget:.3f} CPUs per trial are too few")
    return cfg
