"""The bank stage on Ray Data: sampler actors feed reward actors; shards are committed as they fill.

    ids --(sampler pool: the flow model, SDE/ODE)--> x --(reward pool)--> (x, reward, valid, error)

The two pools are separate actor pools with their own size, CPUs and GPUs. The driver streams the
results, writes each complete shard of ``bank.shard_size`` ids atomically, and on a rerun skips the
shards already on disk: nothing stored is sampled or evaluated again.

With conditions (``data.conditions``, C values) a bank of ``size`` samples per condition has C * size ids; id i
belongs to condition i // size (so each condition's rows are a contiguous id range). The sampler draws each row
from its condition's flow and the reward actors evaluate each row with its condition's value; the bank stores
the condition index in its ``cond`` column and the list of values in its metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bankio import TERM_PREFIX, Bank, concat_banks, read_bank, write_atomic
from pipelines.schema import Config, PoolConfig

__all__ = ["SamplerActor", "RewardActor", "generate_bank", "pool_strategy", "remote_args", "rows_to_bank"]


def _seed_for(seed: int, label: str, first_id: int) -> int:
    digest = hashlib.sha256(f"{seed}:{label}:{first_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SamplerActor:
    """Ray Data callable class: ids -> samples from the flow model.

    Args:
        model: ``[ObjectRef]`` (or ``[(config, state_dict)]``) of the velocity network.
        sampler: dict with ``kind`` (sde | ode), ``steps`` and ``grid``.
        seed, label: the noise of a batch is a function of (seed, label, first id in the batch).
        per_condition: with conditions, the samples per condition (id i has condition i // per_condition);
            0 without conditions.
    """

    def __init__(
        self, model: list[Any], sampler: dict[str, Any], seed: int, label: str, dim: int, use_gpu: bool = False,
        per_condition: int = 0,
    ):
        import ray

        from pipelines.models import build_model

        payload = model[0]
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        config, state = payload
        torch.set_num_threads(1)
        # a GPU only when the pool asked for one (Ray then sets CUDA_VISIBLE_DEVICES for this actor)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_model(config, state).to(self.device).eval()
        self.sampler = dict(sampler)
        self.seed, self.label, self.dim = seed, label, dim
        self.per_condition = int(per_condition)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tfft.sampling import sample_ode, sample_sde, time_grid

        ids = np.asarray(batch["data"], dtype=np.int64).reshape(-1)
        gen = torch.Generator().manual_seed(_seed_for(self.seed, self.label, int(ids[0])))
        x0 = torch.randn(len(ids), self.dim, generator=gen).to(self.device)
        cond = None
        if self.per_condition:
            cond = torch.as_tensor(ids // self.per_condition, dtype=torch.long, device=self.device)
        with torch.no_grad():
            if self.sampler["kind"] == "sde":
                sde_gen = torch.Generator(device=self.device).manual_seed(
                    _seed_for(self.seed + 1, self.label, int(ids[0]))
                )
                x1 = sample_sde(self.model, x0, int(self.sampler["steps"]), generator=sde_gen, cond=cond)
            else:
                grid = time_grid(int(self.sampler["steps"]), kind=self.sampler["grid"]).to(self.device)
                x1 = sample_ode(self.model, x0, grid, cond)
        out = {"id": ids, "x": x1.cpu().numpy().astype(np.float64)}
        if cond is not None:
            out["cond"] = cond.cpu().numpy().astype(np.int64)
        return out


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


def pool_strategy(pool: PoolConfig) -> Any:
    """ActorPoolStrategy of a pool config: fixed size, or autoscaling min/max."""
    from ray.data import ActorPoolStrategy

    if pool.min_size is not None:
        return ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size)
    return ActorPoolStrategy(size=pool.size)


def remote_args(pool: PoolConfig) -> dict[str, Any]:
    """Extra Ray actor options of a pool: its custom resources. (Ray Data's own defaults restart a
    killed actor and retry the batches it held; tests/pipelines/test_cluster.py checks that.)"""
    return {"resources": {k: float(v) for k, v in pool.resources.items()}} if pool.resources else {}


def _shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.parquet"


def generate_bank(
    cfg: Config,
    model: tuple[dict[str, Any], dict[str, torch.Tensor]],
    *,
    size: int,
    label: str,
    out_path: str | Path,
    log: Callable[[str], None] = print,
) -> Bank:
    """Sample ``size`` points from ``model``, score them, and write ``out_path`` (parquet).

    Shards go to ``<out_path>.shards/``; shards already there are kept (resume). With ``data.conditions``
    ``size`` is the total, a multiple of the number of conditions (module docstring).
    """
    from pipelines.conditions import conditions_of

    conditions = conditions_of(cfg) or None
    if conditions and size % len(conditions):
        raise ValueError(f"a conditional bank's size ({size}) must be a multiple of its {len(conditions)} conditions")

    out_path = Path(out_path)
    if out_path.is_file():
        bank = read_bank(out_path)
        if len(bank) == size:
            log(f"[bank {label}] reusing {out_path} ({size} samples)")
            return dataclasses.replace(bank, conditions=conditions) if conditions else bank
    shard_dir = out_path.with_name(out_path.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    shard_size = cfg.bank.shard_size
    n_shards = -(-size // shard_size)
    shard_ranges = [(k * shard_size, min((k + 1) * shard_size, size)) for k in range(n_shards)]
    done = {k for k in range(n_shards) if _shard_path(shard_dir, k).is_file()}
    todo = [k for k in range(n_shards) if k not in done]
    if done:
        log(f"[bank {label}] resuming: {len(done)}/{n_shards} shards already stored")
    if todo:
        _run_pools(cfg, model, label, shard_dir, [shard_ranges[k] + (k,) for k in todo], size, log)
    bank = concat_banks([read_bank(_shard_path(shard_dir, k)) for k in range(n_shards)])
    if conditions:
        bank = dataclasses.replace(bank, conditions=conditions)
    write_atomic(bank, out_path)
    return bank


def _run_pools(
    cfg: Config,
    model: tuple[dict[str, Any], dict[str, torch.Tensor]],
    label: str,
    shard_dir: Path,
    shards: list[tuple[int, int, int]],
    size: int,
    log: Callable[[str], None],
) -> None:
    import ray
    import ray.data

    from pipelines.conditions import conditions_of

    conditions = conditions_of(cfg) or None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # > 0: every actor of a pool is up before work flows (so work spreads over the pool's nodes), and
    # a pool the cluster has no room for fails with Ray's "Timed out while starting actors" error
    ctx.wait_for_min_actors_s = int(math.ceil(cfg.bank.start_timeout_s)) if cfg.bank.start_timeout_s > 0 else -1
    sampler_pool, reward_pool = cfg.bank.sampler, cfg.bank.reward
    block = max(1, min(sampler_pool.batch_size, max(b - a for a, b, _ in shards)))
    chunks = [np.arange(a, b, dtype=np.int64) for a, b, _ in shards]
    blocks = [c[i : i + block] for c in chunks for i in range(0, len(c), block)]
    model_ref = ray.put(model)
    ds = ray.data.from_numpy(blocks)
    ds = ds.map_batches(
        SamplerActor,
        fn_constructor_kwargs={
            "model": [model_ref],
            "sampler": {"kind": cfg.sampler.kind, "steps": cfg.sampler.steps, "grid": cfg.sampler.grid},
            "seed": cfg.seed,
            "label": label,
            "dim": int(model[0]["dim"]),
            "use_gpu": sampler_pool.num_gpus > 0,
            "per_condition": size // len(conditions) if conditions else 0,
        },
        compute=pool_strategy(sampler_pool),
        num_cpus=sampler_pool.num_cpus,
        num_gpus=sampler_pool.num_gpus,
        batch_size=block,
        **remote_args(sampler_pool),
    )
    ds = ds.map_batches(
        RewardActor,
        fn_constructor_kwargs={
            "target": cfg.reward.target,
            "kwargs": dict(cfg.reward.kwargs),
            "pool": {k: getattr(reward_pool, k) for k in ("call_size", "max_in_flight", "retries", "backoff_s")},
            "cache_dir": cfg.bank.cache_dir if cfg.bank.cache else None,
            "conditions": conditions,
        },
        compute=pool_strategy(reward_pool),
        num_cpus=reward_pool.num_cpus,
        num_gpus=reward_pool.num_gpus,
        batch_size=reward_pool.batch_size,
        **remote_args(reward_pool),
    )
    bounds = np.array([a for a, _, _ in shards] + [shards[-1][1]])
    pending: dict[int, list[dict[str, np.ndarray]]] = {k: [] for _, _, k in shards}
    filled: dict[int, int] = {k: 0 for _, _, k in shards}
    need = {k: b - a for a, b, k in shards}
    total = sum(need.values())
    done_rows, invalid, from_cache, start, last_print = 0, 0, 0, time.time(), 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids = batch["id"]
        which = np.searchsorted(bounds, ids, side="right") - 1
        for pos in np.unique(which):
            a, b, k = shards[pos]
            sel = which == pos
            pending[k].append({key: np.asarray(val)[sel] for key, val in batch.items()})
            filled[k] += int(sel.sum())
            if filled[k] == need[k]:
                parts = pending.pop(k)
                write_atomic(rows_to_bank(parts), _shard_path(shard_dir, k))
        done_rows += len(ids)
        invalid += int((~batch["valid"].astype(bool)).sum())
        from_cache += int(batch["cached"].astype(bool).sum())
        now = time.time()
        if now - last_print > 5 or done_rows == total:
            rate = done_rows / max(now - start, 1e-9)
            log(
                f"[bank {label}] {done_rows}/{total} samples, {rate:.0f} samples/s, "
                f"{invalid} invalid so far, {from_cache} from the reward cache"
            )
            last_print = now
    if any(filled[k] != need[k] for k in need):
        missing = {k: need[k] - filled[k] for k in need if filled[k] != need[k]}
        raise RuntimeError(f"bank {label}: shards incomplete after the pipeline ran: {missing}")


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
