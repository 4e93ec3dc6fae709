"""The evaluation stage: fresh samples of the fine-tuned model, ``out/bank_final.parquet`` (``eval.size`` per
condition, resumable), then the guard's evaluation check (`pipelines.eval_guard`), which may keep the base model.

The check is skipped after threshold refinement (its rounds keep their own states, and its table shows each
round) and with conditions (its statistic is pooled, and the base bank's rows are not an evaluation bank per
condition).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.bankio import Bank
from pipelines.conditions import condition_count, conditions_of
from pipelines.eval_guard import apply_evaluation_check
from pipelines.schema import Config
from pipelines.screening import bank_for
from pipelines.stage_record import StageRecord
from pipelines.stages.base import BaseStage
from pipelines.stages.train import TrainStage

__all__ = ["EvaluateStage", "evaluate"]


@dataclass(frozen=True)
class EvaluateStage:
    """The final bank and what the stage did (`pipelines.bank.build_bank`'s record; its seconds include the
    evaluation check)."""

    bank: Bank
    record: StageRecord


def evaluate(cfg: Config, out: Path, base: BaseStage, trained: TrainStage, *,
             log: Callable[[str], None] = print) -> EvaluateStage:
    """The final bank, samples of ``trained.state`` (a `Bank`, frozen), or the base bank itself when the
    evaluation check rejected the fine-tuned model; with the record of what this call did."""
    started = time.time()
    final_bank, record = bank_for(
        cfg, (base.model.config, trained.state), size=cfg.eval.size * condition_count(cfg), label="final",
        out_path=out / "bank_final.parquet", tilted=False, log=log,
    )
    if trained.refinement is None and not conditions_of(cfg):
        final_bank = apply_evaluation_check(cfg, out, base.model.state_dict, base.bank, final_bank, trained.tilt,
                                            log=log)
    return EvaluateStage(final_bank, dataclasses.replace(record, seconds=time.time() - started))
