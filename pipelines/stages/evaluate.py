"""The evaluation stage: fresh samples of the fine-tuned model, ``out/bank_final.parquet`` (``eval.size`` per
condition, resumable), then the guard's evaluation check (`pipelines.eval_guard`), which may keep the base model.

After threshold refinement the check judges the refined model (refinement's last round, whose checkpoint
records the decision); with conditions it compares the mean over conditions of each condition's statistic.
A screened bank is judged on its certified tail or its audit (`pipelines.eval_guard`). With
``finetune.guard_paired_size`` the check reads its own two banks, of the base and of the fine-tuned model with
common noise (`pipelines.eval_paired`), and the final bank only reports. A rerun after the check kept the base
model reuses the base bank as the final bank (what the first call reported) instead of sampling the base model
again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.bankio import Bank
from pipelines.bank import build_bank, reused_counts
from pipelines.conditions import condition_count
from pipelines.eval_guard import EvaluationCheck, apply_evaluation_check, kept_base
from pipelines.eval_paired import NOISE_KEY, check_paired
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
        counts = reused_counts(base.bank, cfg.bank.shard_size)
        return EvaluateStage(base.bank, StageRecord(REUSED, time.time() - started, counts))
    final_bank, record = bank_for(
        cfg, (base.model.config, trained.state), size=cfg.eval.size * condition_count(cfg), label="final",
        out_path=out / "bank_final.parquet", tilted=False, log=log,
    )
    paired = _paired_check(cfg, out, base, trained, log) if cfg.finetune.guard_paired_size else None
    final_bank = apply_evaluation_check(cfg, out, base.model.state_dict, base.bank, final_bank, trained.tilt,
                                        log=log, model_dir=trained.model_dir, check=paired)
    return EvaluateStage(final_bank, dataclasses.replace(record, seconds=time.time() - started))


def _paired_check(cfg: Config, out: Path, base: BaseStage, trained: TrainStage,
                  log: Callable[[str], None]) -> EvaluationCheck:
    """``finetune.guard_paired_size`` samples (per condition) of the base and of the fine-tuned model with common
    noise, ``out/guard/check_{base,finetuned}.parquet`` (resumable), compared pairwise (`pipelines.eval_paired`)."""
    size = cfg.finetune.guard_paired_size * condition_count(cfg)
    banks = [build_bank(cfg, (base.model.config, state), size=size, label=label, log=log, noise_key=NOISE_KEY,
                        out_path=out / "guard" / f"{label}.parquet")[0]
             for label, state in (("check_base", base.model.state_dict), ("check_finetuned", trained.state))]
    return check_paired(*banks, trained.tilt, invalid_reward=cfg.objective.invalid_reward,
                        validity_drop=cfg.finetune.guard_validity_drop, margin=cfg.finetune.guard_eval_margin)
