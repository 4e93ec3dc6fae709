"""The evaluation stage: fresh samples of the fine-tuned model, ``out/bank_final.parquet`` (``eval.size`` per
condition, resumable), then the guard's evaluation check (`pipelines.eval_guard`), which may keep the base model.

After threshold refinement the check judges the refined model (refinement's last round, whose checkpoint
records the decision); with conditions it compares the mean over conditions of each condition's statistic.
A screened bank is judged on its certified tail or its audit (`pipelines.eval_guard`). A rerun after the check
kept the base model reuses the base bank as the final bank (what the first call reported) instead of sampling the
base model again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.bankio import Bank
from pipelines.conditions import condition_count
from pipelines.eval_guard import apply_evaluation_check, kept_base
from pipelines.schema import Config
from pipelines.screening import bank_for
from pipelines.stage_record import REUSED, StageRecord
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
    if kept_base(trained.model_dir or out):
        log("[bank final] the evaluation check kept the base model: the final bank is the base bank")
        counts = {"samples": len(base.bank), "sampled": 0, "from_cache": 0, "from_shards": 0,
                  "from_file": len(base.bank)}
        if base.bank.screening is not None:  # a screened bank's counts: no expensive call in this stage
            calls = int(base.bank.screening["expensive_calls"])
            counts.update(expensive_calls=calls, expensive_stored=calls, expensive_new=0)
        return EvaluateStage(base.bank, StageRecord(REUSED, time.time() - started, counts))
    final_bank, record = bank_for(
        cfg, (base.model.config, trained.state), size=cfg.eval.size * condition_count(cfg), label="final",
        out_path=out / "bank_final.parquet", tilted=False, log=log,
    )
    final_bank = apply_evaluation_check(cfg, out, base.model.state_dict, base.bank, final_bank, trained.tilt,
                                        log=log, model_dir=trained.model_dir)
    return EvaluateStage(final_bank, dataclasses.replace(record, seconds=time.time() - started))
