"""Reward pools for chosen samples: the expensive reward of screened evaluation (`pipelines.screening`).

A pool maps (ids (k,), x (k, d)) to a :class:`pipelines.bankio.Bank` of those k rows with rewards, validity,
failure reasons and the reward cache's flags, exactly as the bank's reward pool scores them (each row goes
through a :class:`pipelines.reward_actor.RewardActor`). Unlike the bank's Ray Data pipeline, the pool lives across
calls: screened evaluation sends one batch after another, and actors are started once.
"""

from __future__ import annotations

import numpy as np

from pipelines.bank import remote_args
from pipelines.bankio import Bank
from pipelines.reward_actor import RewardActor, actor_arguments, rows_to_bank
from pipelines.schema import Config

__all__ = ["LocalRewardPool", "ActorRewardPool"]


def _chunks(ids: np.ndarray, x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"id": ids[i : i + size], "x": x[i : i + size]} for i in range(0, len(ids), size)]


class _Scorer(RewardActor):
    """A :class:`RewardActor` with a named method (a Ray actor handle is called by method name)."""

    def score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self(batch)


class LocalRewardPool:
    """One :class:`RewardActor` in this process (no Ray): for tests and small banks."""

    def __init__(self, cfg: Config):
        self.actor = RewardActor(**actor_arguments(cfg))
        self.batch_size = cfg.bank.reward.batch_size

    def __call__(self, ids: np.ndarray, x: np.ndarray) -> Bank:
        return rows_to_bank([self.actor(chunk) for chunk in _chunks(ids, x, self.batch_size)])

    def close(self) -> None:
        pass


class ActorRewardPool:
    """``bank.reward.size`` Ray actors (``max_size`` of an autoscaling pool) with the pool's resources; a batch
    is split evenly over them (at most ``bank.reward.batch_size`` rows per call). Actors restart and retry a
    call when they die, as Ray Data's do."""

    def __init__(self, cfg: Config):
        import ray

        pool = cfg.bank.reward
        count = pool.size if pool.max_size is None else pool.max_size
        actor = ray.remote(_Scorer).options(
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=2, max_task_retries=2, **remote_args(pool)
        )
        arguments = actor_arguments(cfg)
        self.actors = [actor.remote(**arguments) for _ in range(count)]
        self.batch_size = pool.batch_size

    def __call__(self, ids: np.ndarray, x: np.ndarray) -> Bank:
        import ray

        size = max(1, min(self.batch_size, -(-len(ids) // len(self.actors))))
        calls = [self.actors[k % len(self.actors)].score.remote(chunk)
                 for k, chunk in enumerate(_chunks(ids, x, size))]
        return rows_to_bank(ray.get(calls))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
