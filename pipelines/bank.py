"""The bank stage on Ray Data: sampler actors feed reward actors; shards are committed as they fill.

    ids --(sampler pool: the flow model, SDE/ODE)--> x --(reward pool)--> (x, reward, valid, error)

The two pools are separate actor pools with their own size, CPUs and GPUs. The driver streams the
results, writes each complete shard of ``bank.shard_size`` ids atomically, and on a rerun skips the
shards already on disk: nothing stored is sampled or evaluated again.

With conditions (``data.conditions``, C values) a bank of ``size`` samples per condition has C * size ids; id i
belongs to condition i // size (so each condition's rows are a contiguous id range). The sampler draws each row
from its condition's flow and the reward actors evaluate each row with its condition's value; the bank stores
the condition index in its ``cond`` column and the list of values in its metadata.

:func:`build_bank` also says what the call did (`pipelines.stage_record.StageRecord`): the bank file reused,
shards resumed, and how many samples were drawn in this call (of which how many took their reward from the
reward cache) or came from shards stored earlier.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bankio import Bank, concat_banks, read_bank, write_atomic
from pipelines.reward_actor import RewardActor, actor_arguments, rows_to_bank
from pipelines.sampler_actor import SamplerActor
from pipelines.schema import Config, PoolConfig
from pipelines.stage_record import BUILT, RESUMED, REUSED, StageRecord

__all__ = ["generate_bank", "build_bank", "reused_counts", "pool_strategy", "remote_args"]


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


def generate_bank(cfg: Config, model: tuple[dict[str, Any], dict[str, torch.Tensor]], **where: Any) -> Bank:
    """Sample ``size`` points from ``model``, score them, and write ``out_path`` (parquet): :func:`build_bank`
    (keywords ``size``, ``label``, ``out_path``, ``log``) without its record.

    Shards go to ``<out_path>.shards/``; shards already there are kept (resume). With ``data.conditions``
    ``size`` is the total, a multiple of the number of conditions (module docstring).
    """
    return build_bank(cfg, model, **where)[0]


def build_bank(
    cfg: Config,
    model: tuple[dict[str, Any], dict[str, torch.Tensor]],
    *,
    size: int,
    label: str,
    out_path: str | Path,
    log: Callable[[str], None] = print,
    noise_key: str | None = None,
) -> tuple[Bank, StageRecord]:
    """:func:`generate_bank` and its record (``noise_key``: each row's noise a function of (seed, key, id),
    `pipelines.sampler_actor.row_noise`; None: of its batch): status ``reused`` (the file), ``resumed`` (shards stored before) or
    ``built``; counts ``samples``, ``sampled`` (drawn and scored in this call), ``from_cache`` (of those, rewards
    from the reward cache), ``from_shards`` (rows of shards stored by an earlier call), ``from_file`` (rows of
    the reused file), ``shards`` and ``shards_resumed``."""
    started = time.time()
    from pipelines.conditions import conditions_of

    conditions = conditions_of(cfg) or None
    if conditions and size % len(conditions):
        raise ValueError(f"a conditional bank's size ({size}) must be a multiple of its {len(conditions)} conditions")

    out_path = Path(out_path)
    shard_size = cfg.bank.shard_size
    n_shards = -(-size // shard_size)
    if out_path.is_file():
        bank = read_bank(out_path)
        if len(bank) == size:
            log(f"[bank {label}] reusing {out_path} ({size} samples)")
            counts = reused_counts(bank, shard_size)
            bank = dataclasses.replace(bank, conditions=conditions) if conditions else bank
            return bank, StageRecord(REUSED, time.time() - started, counts)
    shard_dir = out_path.with_name(out_path.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    shard_ranges = [(k * shard_size, min((k + 1) * shard_size, size)) for k in range(n_shards)]
    done = {k for k in range(n_shards) if _shard_path(shard_dir, k).is_file()}
    todo = [k for k in range(n_shards) if k not in done]
    if done:
        log(f"[bank {label}] resuming: {len(done)}/{n_shards} shards already stored")
    if todo:
        _run_pools(cfg, model, label, shard_dir, [shard_ranges[k] + (k,) for k in todo], size, log, noise_key)
    shards = [read_bank(_shard_path(shard_dir, k)) for k in range(n_shards)]
    bank = concat_banks(shards)
    if conditions:
        bank = dataclasses.replace(bank, conditions=conditions)
    write_atomic(bank, out_path)
    counts = _counts(size, n_shards, sampled=sum(len(shards[k]) for k in todo),
                     from_cache=sum(int(shards[k].cached.sum()) for k in todo),
                     from_shards=sum(len(shards[k]) for k in done), from_file=0, resumed=len(done))
    return bank, StageRecord(RESUMED if done else BUILT, time.time() - started, counts)


def reused_counts(bank: Bank, shard_size: int) -> dict[str, int]:
    """The counts of a bank a stage reused whole (every row from the file, nothing sampled); a screened bank's
    (its ``screening`` record) adds its expensive calls, all stored before (`pipelines.screening`)."""
    n = len(bank)
    counts: dict[str, int] = _counts(n, -(-n // shard_size), sampled=0, from_cache=0, from_shards=0, from_file=n,
                                     resumed=0)
    if bank.screening is not None:
        calls = int(bank.screening["expensive_calls"])
        counts.update(expensive_calls=calls, expensive_stored=calls, expensive_new=0)
    return counts


def _counts(size: int, n_shards: int, *, sampled: int, from_cache: int, from_shards: int, from_file: int,
            resumed: int) -> dict[str, int]:
    """A bank record's counts (:func:`build_bank`); sampled + from_shards + from_file = samples."""
    return {"samples": size, "sampled": sampled, "from_cache": from_cache, "from_shards": from_shards,
            "from_file": from_file, "shards": n_shards, "shards_resumed": resumed}


def _run_pools(
    cfg: Config,
    model: tuple[dict[str, Any], dict[str, torch.Tensor]],
    label: str,
    shard_dir: Path,
    shards: list[tuple[int, int, int]],
    size: int,
    log: Callable[[str], None],
    noise_key: str | None = None,
) -> None:
    """Sample and score the ids of ``shards`` ((first id, end id, shard index) each) through the two pools,
    writing each shard as soon as all its rows are back."""
    ds = _pipeline(cfg, model, label, shards, size, noise_key)
    bounds = np.array([a for a, _, _ in shards] + [shards[-1][1]])
    pending: dict[int, list[dict[str, np.ndarray]]] = {k: [] for _, _, k in shards}
    filled: dict[int, int] = {k: 0 for _, _, k in shards}
    need = {k: b - a for a, b, k in shards}
    progress = _Progress(label, sum(need.values()), log)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        which = np.searchsorted(bounds, batch["id"], side="right") - 1
        for pos in np.unique(which):
            a, b, k = shards[pos]
            sel = which == pos
            pending[k].append({key: np.asarray(val)[sel] for key, val in batch.items()})
            filled[k] += int(sel.sum())
            if filled[k] == need[k]:
                parts = pending.pop(k)
                write_atomic(rows_to_bank(parts), _shard_path(shard_dir, k))
        progress.update(batch)
    if any(filled[k] != need[k] for k in need):
        missing = {k: need[k] - filled[k] for k in need if filled[k] != need[k]}
        raise RuntimeError(f"bank {label}: shards incomplete after the pipeline ran: {missing}")


def _pipeline(
    cfg: Config, model: tuple[dict[str, Any], dict[str, torch.Tensor]], label: str,
    shards: list[tuple[int, int, int]], size: int, noise_key: str | None = None,
) -> Any:
    """The Ray Data pipeline: blocks of ids -> sampler pool (:class:`SamplerActor`) -> reward pool
    (`pipelines.reward_actor.RewardActor`)."""
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
    sampler = {
        "model": [ray.put(model)],
        "sampler": {"kind": cfg.sampler.kind, "steps": cfg.sampler.steps, "grid": cfg.sampler.grid},
        "seed": cfg.seed,
        "label": label,
        "dim": int(model[0]["dim"]),
        "use_gpu": sampler_pool.num_gpus > 0,
        "per_condition": size // len(conditions) if conditions else 0,
        "noise_key": noise_key,
    }
    ds = ray.data.from_numpy(blocks)
    for actor, kwargs, pool, batch_size in ((SamplerActor, sampler, sampler_pool, block),
                                            (RewardActor, actor_arguments(cfg, conditions), reward_pool,
                                             reward_pool.batch_size)):
        ds = ds.map_batches(actor, fn_constructor_kwargs=kwargs, compute=pool_strategy(pool), num_cpus=pool.num_cpus,
                            num_gpus=pool.num_gpus, batch_size=batch_size, **remote_args(pool))
    return ds


class _Progress:
    """The bank's progress line: at most every 5 s, and at the end."""

    def __init__(self, label: str, total: int, log: Callable[[str], None]):
        self.label, self.total, self.log = label, total, log
        self.rows, self.invalid, self.cached, self.start, self.last = 0, 0, 0, time.time(), 0.0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        self.rows += len(batch["id"])
        self.invalid += int((~batch["valid"].astype(bool)).sum())
        self.cached += int(batch["cached"].astype(bool).sum())
        now = time.time()
        if now - self.last > 5 or self.rows == self.total:
            rate = self.rows / max(now - self.start, 1e-9)
            self.log(
                f"[bank {self.label}] {self.rows}/{self.total} samples, {rate:.0f} samples/s, "
                f"{self.invalid} invalid so far, {self.cached} from the reward cache"
            )
            self.last = now
