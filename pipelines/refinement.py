"""Threshold refinement in the pipeline (DESIGN §5): the loop and its maths are :func:`tfft.refine.refine_threshold`
(through `tfft.objective.Tilt.refine`).

This module supplies the loop's ``measure(eta)``: the model fine-tuned at eta draws ``threshold.refine_size``
samples (``out/refine/bank-K.parquet``), and the mass of their rewards beyond eta is measured together with
their alpha-VaR (the proposal; `tfft.objective.Tilt.measure`). Before measuring round K > 1 it fine-tunes at
that round's eta, warm-started from the previous model, into ``out/refine/round-(K-1)``; after the last round it
fine-tunes at the refined eta into ``out/refine/round-K``. Banks and checkpoints are reused from disk, so an
interrupted refinement resumes (the thresholds are a deterministic function of the stored banks). The refinement
is only as good as each round's fine-tuning: a model that has not converged at eta under-reports its tail mass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bank import generate_bank
from pipelines.bankio import Bank
from pipelines.pretrain import BaseModel
from pipelines.schema import Config
from pipelines.tracking import TrackedRun
from tfft.objective import Tilt
from tfft.bracket import TailMeasurement
from tfft.refine import RefineRound

__all__ = ["refine_threshold", "final_round_dir", "FineTune", "SampleBank"]

FineTune = Callable[[Path, Tilt, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
# (cfg, (model config, state), *, size, label, out_path, log) -> the model's scored bank (`generate_bank`'s shape)
SampleBank = Callable[..., Bank]


class _Rounds:
    """``measure(eta)`` for :func:`tfft.refine.refine_threshold`, holding the model fine-tuned at the last eta.

    Call k (1-based) measures the model fine-tuned at eta; from the second call on, that model is first
    fine-tuned into ``refine/round-(k-1)`` from the previous one. :meth:`advance` does the same after the loop.
    """

    def __init__(
        self, cfg: Config, out: Path, base: BaseModel, tilt: Tilt,
        state: dict[str, torch.Tensor], finetune: FineTune, log: Callable[[str], None], sample: SampleBank,
    ):
        self.cfg, self.dir, self.base, self.finetune, self.log = cfg, out / "refine", base, finetune, log
        self.tilt, self.state, self.round, self.sample = tilt, state, 0, sample

    def advance(self, eta: float) -> None:
        """Fine-tune at ``eta`` into ``refine/round-K`` (K = rounds measured so far), warm-started."""
        self.tilt = self.tilt.with_eta(eta)
        self.state = self.finetune(self.dir / f"round-{self.round}", self.tilt, self.state)

    def __call__(self, eta: float) -> TailMeasurement:
        if self.round > 0:
            self.advance(eta)
        self.round += 1
        k = self.round
        bank = self.sample(
            self.cfg, (self.base.config, self.state), size=self.cfg.threshold.refine_size, label=f"refine{k}",
            out_path=self.dir / f"bank-{k}.parquet", log=self.log,
        )
        reward, valid = bank.scored(self.cfg.objective.invalid_reward)
        r = reward[valid]
        if r.size == 0:
            raise RuntimeError(f"refine round {k}: no valid reward in {self.dir / f'bank-{k}.parquet'}")
        return self.tilt.with_eta(eta).measure(r)


def final_round_dir(out: Path, rounds: list[dict[str, Any]]) -> Path:
    """The directory whose ``checkpoint/model.pt`` holds the refined model: ``out/refine/round-K`` after K measured
    rounds (:meth:`_Rounds.advance` fine-tunes there after the loop), ``out`` itself without rounds."""
    return out / "refine" / f"round-{len(rounds)}" if rounds else out


def refine_threshold(
    cfg: Config,
    out: Path,
    base: BaseModel,
    base_bank: Bank,
    tilt: Tilt,
    state: dict[str, torch.Tensor],
    *,
    run: TrackedRun,
    finetune: FineTune,
    log: Callable[[str], None] = print,
    sample: SampleBank = generate_bank,
) -> tuple[dict[str, torch.Tensor], Tilt, list[dict[str, Any]]]:
    """Threshold refinement (DESIGN §5) from a model already fine-tuned at ``tilt.eta`` (``state``).

    Runs ``threshold.refine_rounds`` rounds of :func:`tfft.refine.refine_threshold`; on the left side the
    bracket is confined to the basin of the bank's eta* on J_L (the valid base-bank rewards and kl_weight are
    passed). Logs ``refine.eta`` and ``refine.tail_mass`` per round to MLflow and the loop's warnings via ``log``.
    ``sample`` draws and scores each round's bank (`pipelines.bank.generate_bank` through Ray; a test passes its
    own).

    Returns:
        (the state fine-tuned at the refined eta, the tilt at that eta, the rounds as JSON-able dicts:
        round, eta, tail_mass, n, se, proposal, lo, hi (None where open), updated, within_noise, next_eta).
    """
    reward, valid = base_bank.scored(cfg.objective.invalid_reward)
    rewards = np.asarray(reward[valid], dtype=np.float64)
    rounds = _Rounds(cfg, out, base, tilt, state, finetune, log, sample)

    def report(record: RefineRound) -> None:
        lo, hi = record.lo, record.hi
        note = " (within 2 SE of alpha: bracket kept)" if record.within_noise else ""
        log(f"[refine] round {record.round}: eta {record.eta:.4f} -> tail mass {record.tail_mass:.4f} "
            f"(alpha {tilt.alpha}, SE {record.se:.4f}, n {record.n}){note}; bracket ({lo:.4g}, {hi:.4g}); "
            f"next eta {record.next_eta:.4f}")
        run.log_metrics({"refine.eta": record.eta, "refine.tail_mass": record.tail_mass}, step=record.round)

    result = tilt.refine(
        rounds, rounds=cfg.threshold.refine_rounds, step=float(np.std(rewards)) or 1.0, bank_rewards=rewards,
        on_round=report, on_warning=lambda warning: log(f"[refine] WARNING: {warning}"),
    )
    if result.rounds:
        rounds.advance(result.eta)
    return rounds.state, rounds.tilt, result.records()
