"""Threshold refinement in the pipeline (DESIGN §5): the maths is :mod:`tfft.refine`.

Each round draws ``threshold.refine_size`` samples from the model fine-tuned at the current eta, measures
its tail mass beyond eta, shrinks the bracket around eta*, and fine-tunes again at the next eta, warm-started
from the previous model. Round K lives in ``out/refine/`` (bank-K.parquet, round-K/checkpoint), so an
interrupted refinement resumes. The refinement is only as good as each round's fine-tuning: a model that
has not converged at eta under-reports its tail mass and can steer the bracket the wrong way.
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
from tfft.refine import Bracket, next_threshold, update_bracket
from tfft.tail import var

__all__ = ["refine_threshold"]


def refine_threshold(
    cfg: Config,
    out: Path,
    base: BaseModel,
    base_bank: Bank,
    objective: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    run: TrackedRun,
    finetune: Callable[[Path, dict[str, Any], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    log: Callable[[str], None] = print,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, float]]]:
    """Threshold refinement (DESIGN §5): measure the fine-tuned model's tail mass beyond eta, bracket eta*,
    fine-tune again warm-started at the next eta. Each round lives in ``out/refine/round-K/`` (resumable)."""
    side, alpha = objective["side"], objective["alpha"]
    rewards = base_bank.reward[base_bank.valid]
    step = float(np.std(rewards)) or 1.0
    bracket, rounds = Bracket(), []
    for k in range(1, cfg.threshold.refine_rounds + 1):
        eta = float(objective["eta"])
        bank = generate_bank(
            cfg, (base.config, state), size=cfg.threshold.refine_size, label=f"refine{k}",
            out_path=out / "refine" / f"bank-{k}.parquet", log=log,
        )
        r = bank.reward[bank.valid]
        mass = float(np.mean(r > eta) if side == "right" else np.mean(r < eta))
        bracket = update_bracket(bracket, eta, mass, alpha=alpha, side=side)
        open_side = not (np.isfinite(bracket.lo) and np.isfinite(bracket.hi))
        new_eta = next_threshold(
            bracket, alpha=alpha, step=step * 2 ** (k - 1) if open_side else step,
            proposal=var(r, side=side, alpha=alpha), floor=0.5 / max(len(r), 1),
        )
        finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (JSON has no infinity)
        rounds.append({"round": k, "eta": eta, "tail_mass": mass, "lo": finite(bracket.lo),
                       "hi": finite(bracket.hi), "next_eta": new_eta})
        log(f"[refine] round {k}: eta {eta:.4f} -> tail mass {mass:.4f} (alpha {alpha}); bracket "
            f"({bracket.lo:.4g}, {bracket.hi:.4g}); next eta {new_eta:.4f}")
        run.log_metrics({"refine.eta": eta, "refine.tail_mass": mass}, step=k)
        objective = {**objective, "eta": new_eta}
        state = finetune(out / "refine" / f"round-{k}", objective, state)
    return state, objective, rounds
