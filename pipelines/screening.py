"""Screened banks: every sample gets the cheap ``reward.screen`` reward, the expensive reward only where the tail
can be (`tfft.screen.screened_evaluate`; the README's "Screened evaluation").

    ids --(sampler pool)--> x --(reward pool, screen reward)--> s        <out>.screen.parquet (shards, resumable)
    audit + tail-most s first --(reward actors, expensive reward)--> r   <out>.evaluated/part-*.parquet (journal)
    -> <out>.parquet with columns screen, evaluated, audited              <out>.screen.json (accounting)

Stage one is the ordinary bank stage with the screen as its reward (`pipelines.bank.generate_bank`: the same
samples as an unscreened bank of that label, the same shards and reward cache). Stage two sends only the chosen
samples through reward actors (`pipelines.reward_pool`); each batch's results are committed to a journal before
the next one is chosen, and the choices are a deterministic function of the stored values, so a rerun after a
kill replays the finished batches from the journal (and the reward cache) without calling the reward again.

What the certificate covers. The base bank certifies the tail of the objective (r beyond eta*, at the objective's
kl_weight): the threshold, the tilt weights, the pseudo-reward and the target's statistics on that side. The
evaluation bank of the fine-tuned model certifies its own alpha-tail instead (re-solved untilted: kl_weight -> oo
makes eta the bank's alpha-VaR), because what is reported there is the model's own CVaR. Failed expensive calls
count, for the stopping rule only, as samples outside the tail (at ``objective.invalid_reward`` when one is set);
the stored bank keeps them as failures. Refinement banks (``threshold.refine_rounds``) and the adjoint solver's
training trajectories are not screened.

In memory the pipeline works on :func:`working_view`: unevaluated rows take the placeholder reward of
`tfft.screen.placeholder_rewards` (the far end of the evaluated ones), where the pseudo-reward is 0, so the
threshold, tilt and weighted solver need no change; statistics that need every sample come from the audit
(`pipelines.screen_stats`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bank import build_bank, reused_counts
from pipelines.bankio import Bank, concat_banks, read_bank, write_atomic
from pipelines.schema import Config, ScreenConfig
from pipelines.stage_record import BUILT, RESUMED, REUSED, StageRecord
from tfft.screen import ScreenResult, placeholder_rewards, screened_evaluate

__all__ = ["UNTILTED", "Journal", "evaluate_screened", "screened_bank", "working_view", "bank_for", "record_path"]

# A kl_weight so large that J's minimiser is the bank's alpha-VaR (J -> eta + E(r - eta)_+ / alpha).
UNTILTED = 1e12
Pool = Callable[[np.ndarray, np.ndarray], Bank]


class Journal:
    """The expensive results of a screened bank, one parquet part per batch, committed atomically."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        parts = [read_bank(p) for p in sorted(self.dir.glob("part-*.parquet"))]
        self.count = len(parts)
        self.bank = concat_banks(parts) if parts else None
        self.index = {} if self.bank is None else {int(i): k for k, i in enumerate(self.bank.ids)}

    def known(self, ids: np.ndarray) -> np.ndarray:
        return np.array([int(i) in self.index for i in ids], dtype=bool)

    def add(self, part: Bank) -> None:
        write_atomic(part, self.dir / f"part-{self.count:05d}.parquet")
        self.count += 1
        self.bank = part if self.bank is None else concat_banks([self.bank, part])
        self.index = {int(i): k for k, i in enumerate(self.bank.ids)}

    def rows(self, ids: np.ndarray) -> Bank:
        return self.bank.take(np.array([self.index[int(i)] for i in ids], dtype=np.int64))


def _ranking(screens: Bank, side: str) -> np.ndarray:
    """(n,) finite screen scores; a sample whose screen failed ranks as tail-most (evaluated early: unknown)."""
    s = np.where(screens.valid & np.isfinite(screens.reward), screens.reward, np.nan)
    if np.isnan(s).all():
        raise RuntimeError("reward.screen.target failed on every sample of the bank; nothing to rank by")
    top = np.nanmax(s) + 1.0 if side == "right" else np.nanmin(s) - 1.0
    return np.where(np.isnan(s), top, s)


def _stand_ins(rows: Bank, known: Bank, invalid_reward: float | None, side: str) -> np.ndarray:
    """Finite values for the stopping rule: failures at ``invalid_reward``, else outside the tail (module doc)."""
    if rows.valid.all():
        return rows.reward
    if invalid_reward is not None:
        return np.where(rows.valid, rows.reward, invalid_reward)
    good = known.reward[known.valid]
    if good.size == 0:
        raise RuntimeError("the expensive reward failed on every sample evaluated so far (the audit included)")
    return np.where(rows.valid, rows.reward, good.min() if side == "right" else good.max())


def _assemble(screens: Bank, rows: Bank, result: ScreenResult) -> Bank:
    """The stored bank: every sample, expensive columns where evaluated (NaN and valid elsewhere), screen columns."""
    n, at = len(screens), np.flatnonzero(result.evaluated)
    reward, valid, error = np.full(n, np.nan), np.ones(n, dtype=bool), np.full(n, "", dtype=object)
    seconds, attempts, cached = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    terms = {name: np.full(n, np.nan) for name in rows.terms}
    for full, part in ((reward, rows.reward), (valid, rows.valid), (error, rows.error), (seconds, rows.seconds),
                       (attempts, rows.attempts), (cached, rows.cached), *((terms[k], v) for k, v in rows.terms.items())):
        full[at] = part
    screen = np.where(screens.valid, screens.reward, np.nan)
    return Bank(ids=screens.ids, x=screens.x, reward=reward, valid=valid, error=error, seconds=seconds,
                attempts=attempts, cached=cached, terms=terms, screen=screen,
                evaluated=result.evaluated.copy(), audited=result.audited.copy())


def evaluate_screened(
    screens: Bank, pool: Pool, journal: Journal, *, settings: ScreenConfig, side: str, alpha: float,
    kl_weight: float, invalid_reward: float | None, seed: int,
) -> tuple[Bank, ScreenResult]:
    """Screened evaluation of a bank whose ``reward`` column holds the screen (stage two of the module doc).

    ``pool(ids (k,), x (k, d)) -> Bank`` of those rows scored by the expensive reward; rows already in
    ``journal`` are never sent again. Returns the stored bank (:func:`_assemble`) and the library's result.
    """
    def evaluate(indices: np.ndarray) -> np.ndarray:
        ids = screens.ids[indices]
        todo = ~journal.known(ids)
        if todo.any():
            journal.add(pool(ids[todo], screens.x[indices][todo]))
        return _stand_ins(journal.rows(ids), journal.bank, invalid_reward, side)

    result = screened_evaluate(
        _ranking(screens, side), evaluate, side=side, alpha=alpha, kl_weight=kl_weight, audit=settings.audit,
        min_audit=settings.min_audit, tolerance=settings.tolerance, confidence=settings.confidence,
        batch_size=settings.batch_size or None, seed=seed,
    )
    return _assemble(screens, journal.rows(screens.ids[result.evaluated]), result), result


def record_path(out_path: Path) -> Path:
    """``<bank>.screen.json`` beside ``<bank>.parquet``: the accounting of its screened evaluation."""
    return out_path.with_name(out_path.stem + ".screen.json")


def _audit_seed(seed: int, label: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:audit:{label}".encode()).digest()[:4], "little")


def screened_bank(
    cfg: Config, model: tuple[dict[str, Any], dict[str, torch.Tensor]], *, size: int, label: str, out_path: Path,
    kl_weight: float, pool_factory: Callable[[Config], Any] | None = None, log: Callable[[str], None] = print,
) -> tuple[Bank, StageRecord]:
    """Build (or reuse) the screened bank ``out_path`` certified at (objective side, alpha, ``kl_weight``).

    ``pool_factory(cfg)``: the expensive reward's pool (default `pipelines.reward_pool.ActorRewardPool`).
    Returns the bank and its record: the screen bank's counts (`pipelines.bank.build_bank`) and
    ``expensive_calls`` (in all), ``expensive_stored`` (in the journal before this call), ``expensive_new``.
    """
    started = time.time()
    out_path = Path(out_path)
    record = record_path(out_path)
    if out_path.is_file() and record.is_file():
        bank = read_bank(out_path)
        if len(bank) == size and bank.screened:
            log(f"[bank {label}] reusing {out_path} ({size} samples, screened)")
            bank = dataclasses.replace(bank, screening=json.loads(record.read_text()))
            return bank, StageRecord(REUSED, time.time() - started, reused_counts(bank, cfg.bank.shard_size))
    sc, obj = cfg.reward.screen, cfg.objective
    screen_cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, target=sc.target, kwargs=dict(sc.kwargs)))
    screens, stage_one = build_bank(screen_cfg, model, size=size, label=label,
                                    out_path=out_path.with_name(out_path.stem + ".screen.parquet"), log=log)
    journal = Journal(out_path.with_name(out_path.stem + ".evaluated"))
    stored = len(journal.index)
    if journal.count:
        log(f"[bank {label}] resuming screened evaluation: {stored} expensive rewards already stored")
    opened: list[Any] = []

    def pool(ids: np.ndarray, x: np.ndarray) -> Bank:
        if not opened:  # actors start only when something is left to evaluate
            from pipelines.reward_pool import ActorRewardPool

            opened.append((pool_factory or ActorRewardPool)(cfg))
        return opened[0](ids, x)

    try:
        bank, result = evaluate_screened(
            screens, pool, journal, settings=sc, side=obj.side, alpha=obj.alpha, kl_weight=kl_weight,
            invalid_reward=obj.invalid_reward, seed=_audit_seed(cfg.seed, label),
        )
    finally:
        for p in opened:
            p.close()
    info = {**result.record(), "audited": int(result.audited.sum()), "n": size, "target": sc.target,
            "certified": {"side": obj.side, "alpha": obj.alpha, "kl_weight": kl_weight}}
    log(f"[bank {label}] screened: {info['expensive_calls']}/{size} expensive calls ({info['audited']} audited), "
        f"miss rate {info['miss_rate']:.4f} (upper {info['miss_rate_upper']:.4f})"
        + (", full evaluation (no certificate)" if result.full else ""))
    record.write_text(json.dumps(info, indent=2))
    write_atomic(bank, out_path)
    status = BUILT if stage_one.status == BUILT and not stored else RESUMED
    counts = {**stage_one.counts, "expensive_calls": int(info["expensive_calls"]), "expensive_stored": stored,
              "expensive_new": len(journal.index) - stored}
    return dataclasses.replace(bank, screening=info), StageRecord(status, time.time() - started, counts)


def working_view(bank: Bank, side: str) -> Bank:
    """The bank as the pipeline uses it: unevaluated rows at the placeholder reward (module doc), valid."""
    if not bank.screened:
        return bank
    known = bank.evaluated & bank.valid & np.isfinite(bank.reward)
    if not known.any():
        raise RuntimeError("a screened bank has no valid expensive reward")
    filled = placeholder_rewards(np.where(known, bank.reward, np.nan), known, side)
    return dataclasses.replace(bank, reward=np.where(bank.evaluated & ~known, np.nan, filled))


def bank_for(
    cfg: Config, model: tuple[dict[str, Any], dict[str, torch.Tensor]], *, size: int, label: str,
    out_path: Path, tilted: bool, log: Callable[[str], None] = print,
) -> tuple[Bank, StageRecord]:
    """`pipelines.bank.build_bank`, or with ``reward.screen.target`` the :func:`working_view` of a screened
    bank: certified at the objective's kl_weight (``tilted``: the base bank) or untilted (evaluation banks).
    Returns the bank and the record of what this call did."""
    if not cfg.reward.screen.target:
        return build_bank(cfg, model, size=size, label=label, out_path=out_path, log=log)
    kl_weight = cfg.objective.kl_weight if tilted else UNTILTED
    bank, record = screened_bank(cfg, model, size=size, label=label, out_path=Path(out_path), kl_weight=kl_weight,
                                 log=log)
    return working_view(bank, cfg.objective.side), record
