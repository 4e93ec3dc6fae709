"""The reward side of a bank: :class:`RewardActor` scores samples (cache, robust evaluation, terms, conditions),
:func:`rows_to_bank` turns its outputs into a `Bank`, and :func:`actor_arguments` builds its arguments from the
config. Used by the bank's Ray Data pool (`pipelines.bank`) and by screened evaluation's pools
(`pipelines.reward_pool`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipelines.bankio import TERM_PREFIX, Bank, concat_banks
from pipelines.schema import Config

__all__ = ["RewardActor", "rows_to_bank", "actor_arguments"]


def actor_arguments(cfg: Config, conditions: list[Any] | None = None) -> dict[str, Any]:
    """The :class:`RewardActor` constructor kwargs of the config's reward (``bank.reward``'s call settings, the
    cache as configured); ``conditions``: the condition values of a conditional bank (None: unconditional)."""
    pool = cfg.bank.reward
    return {
        "target": cfg.reward.target,
        "kwargs": dict(cfg.reward.kwargs),
        "pool": {k: getattr(pool, k) for k in ("call_size", "max_in_flight", "retries", "backoff_s")},
        "cache_dir": cfg.bank.cache_dir if cfg.bank.cache else None,
        "conditions": conditions,
    }


class _WithCondition:
    """A reward with one condition value bound: ``evaluate(x)`` is ``reward.evaluate(x, cond=[value] * n)``, so the
    robust engine's chunks and bisection need not know about conditions."""

    robust_settings = False

    def __init__(self, reward: Any, value: Any) -> None:
        self.reward, self.value = reward, value

    def evaluate(self, x: torch.Tensor) -> Any:
        return self.reward.evaluate(x, cond=[self.value] * int(x.shape[0]))

    def evaluate_detailed(self, x: Any) -> None:
        return None


class RewardActor:
    """Ray Data callable class: samples -> rewards, validity, failure reasons, attempts, timing.

    Rewards already in the persistent cache are not evaluated again. The rest are scored by the robust
    engine (chunks of ``call_size``, ``max_in_flight`` calls at once, retries with back-off, bisection of
    failing chunks): a failing reward marks samples invalid with a reason and the run goes on. A reward
    with ``term_names`` (`rewards.compose.WeightedSum`) adds one float64 column ``term.<name>`` per term
    (from its result's ``terms``, or from the cache for cached samples; NaN where missing).
    """

    def __init__(self, target: str, kwargs: dict[str, Any], pool: dict[str, Any], cache_dir: str | None,
                 conditions: list[Any] | None = None):
        from pipelines.reward_cache import RewardCache, reward_identity
        from rewards.base import load_reward

        torch.set_num_threads(1)
        self.reward = load_reward(target, kwargs)
        self.term_names = tuple(self.reward.term_names)
        self.pool = dict(pool)
        self.conditions = list(conditions) if conditions else None
        self.cache = None
        if cache_dir:
            # a reward may say which kwargs change its values (Command: not timeouts or batching)
            value_kwargs = self.reward.value_kwargs()
            identity = reward_identity(target, kwargs if value_kwargs is None else value_kwargs, self.reward.version)
            self.cache = RewardCache(cache_dir, identity)

    def _score(self, x: np.ndarray, cond: np.ndarray | None = None) -> Any:
        from rewards.robust import RobustResult

        if cond is not None:  # one robust evaluation per condition present, each with its value bound
            parts = {int(c): self._score_one(_WithCondition(self.reward, self.conditions[int(c)]), x[cond == c])
                     for c in np.unique(cond)}
            n = len(x)
            rewards, valid = np.full(n, np.nan), np.zeros(n, dtype=bool)
            errors, attempts, seconds = [""] * n, np.zeros(n, dtype=np.int64), np.zeros(n)
            for c, res in parts.items():
                rows = np.flatnonzero(cond == c)
                rewards[rows] = np.asarray(res.rewards, dtype=np.float64)
                valid[rows] = np.asarray(res.valid, dtype=bool)
                attempts[rows] = np.asarray(res.attempts, dtype=np.int64)
                seconds[rows] = np.asarray(res.seconds, dtype=np.float64)
                for i, e in zip(rows, res.errors):
                    errors[i] = e
            return RobustResult(rewards, valid, errors, attempts, seconds, sum(r.n_calls for r in parts.values()))
        return self._score_one(self.reward, x)

    def _score_one(self, reward: Any, x: np.ndarray) -> Any:
        from rewards.robust import evaluate_reward_robust

        # an external command (evaluate_detailed) applies its own settings instead of the pool's
        return evaluate_reward_robust(
            reward,
            x,
            batch_size=self.pool["call_size"] or len(x),
            max_in_flight=self.pool["max_in_flight"],
            retries=self.pool["retries"],
            backoff_s=self.pool["backoff_s"],
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.reward_cache import sample_keys

        x = np.array(batch["x"], dtype=np.float64)
        n = x.shape[0]
        cond = np.asarray(batch["cond"], dtype=np.int64) if self.conditions else None
        values = None if cond is None else [self.conditions[int(c)] for c in cond]
        reward = np.full(n, np.nan)
        valid = np.zeros(n, dtype=bool)
        error = np.full(n, "", dtype=object)
        attempts = np.zeros(n, dtype=np.int64)
        seconds = np.zeros(n)
        cached = np.zeros(n, dtype=bool)
        terms = {name: np.full(n, np.nan) for name in self.term_names}
        keys = sample_keys(x, values) if self.cache is not None else None
        if self.cache is not None:
            cached, reward, valid, error = self.cache.lookup(keys)
            if terms:
                terms = self.cache.lookup_terms(keys, self.term_names)
        todo = np.flatnonzero(~cached)
        if todo.size:
            res = self._score(x[todo], None if cond is None else cond[todo])
            reward[todo] = np.asarray(res.rewards, dtype=np.float64)
            valid[todo] = np.asarray(res.valid, dtype=bool)
            error[todo] = np.asarray(res.errors, dtype=object)
            attempts[todo] = np.asarray(res.attempts, dtype=np.int64)
            seconds[todo] = np.asarray(res.seconds, dtype=np.float64)
            for name, values in terms.items():
                got = (res.terms or {}).get(name)
                values[todo] = np.nan if got is None else np.asarray(got, dtype=np.float64)
            if self.cache is not None:
                self.cache.add([keys[i] for i in todo], reward[todo], valid[todo], error[todo],
                               terms={name: values[todo] for name, values in terms.items()})
        valid &= np.isfinite(reward)
        error = np.where(valid, "", np.where(error == "", "nan", error))
        return {
            "id": batch["id"],
            "x": x,
            "reward": np.where(valid, reward, np.nan),
            "valid": valid,
            "error": error.astype(str),
            "attempts": attempts,
            "seconds": seconds,
            "cached": cached,
            **{TERM_PREFIX + name: values for name, values in terms.items()},
            **({} if cond is None else {"cond": cond}),
        }


def rows_to_bank(parts: list[dict[str, np.ndarray]]) -> Bank:
    """A :class:`Bank` (sorted by id) from :class:`RewardActor` outputs."""
    cat = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    return concat_banks(
        [
            Bank(
                ids=cat["id"].astype(np.int64),
                x=np.asarray(cat["x"], dtype=np.float64).reshape(len(cat["id"]), -1),
                reward=cat["reward"].astype(np.float64),
                valid=cat["valid"].astype(bool),
                error=cat["error"].astype(object),
                seconds=cat["seconds"].astype(np.float64),
                attempts=cat["attempts"].astype(np.int64),
                cached=cat["cached"].astype(bool),
                terms={k[len(TERM_PREFIX):]: v.astype(np.float64) for k, v in cat.items() if k.startswith(TERM_PREFIX)},
                cond=cat["cond"].astype(np.int64) if "cond" in cat else None,
            )
        ]
    )
