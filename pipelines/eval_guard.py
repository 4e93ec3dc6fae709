"""The guard's last check, on the evaluation: the fine-tuned model must not end below its base on its own statistic.

The in-training guard (`pipelines.guard`) watches a running metric; the weighted solver has none, and a running
metric can miss what the evaluation then shows. After the evaluation bank, the objective's own statistic
(right-CVaR_alpha, left-CVaR_alpha, or the mean for the expected-reward objective) of the fine-tuned samples is
compared with the base bank's. Both are means of an influence function, so each has a standard error
(`tfft.objective.Tilt.statistic`):

    right:  CVaR+ = mean(phi),  phi_i = q + (r_i - q)_+ / alpha,  q the (1 - alpha)-quantile;
    left:   CVaR- = mean(phi),  phi_i = q - (q - r_i)_+ / alpha,  q the alpha-quantile;
    mean:   phi_i = r_i;        se = std(phi) / sqrt(n).

The fine-tuned model is rejected when its statistic is below the base's by more than ``finetune.
guard_eval_margin`` standard errors of the difference (default 0: below it at all, so that no run ends with a
model measured worse than its base on its own statistic; 2: only a clear loss), or when its fraction of valid
samples is below the base's by more than ``finetune.guard_validity_drop`` plus two standard errors (binomial) of
the difference (a model whose samples mostly fail would otherwise pass on its few valid ones; with
``objective.invalid_reward`` set the failures are scored and count in the statistic too);
:func:`apply_evaluation_check` then keeps the base model in the run directory, and the final bank is the base bank
itself, so that the kept model's statistics are the base's to the digit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bankio import Bank, write_atomic
from pipelines.schema import Config
from tfft.objective import Tilt

__all__ = ["EvaluationCheck", "check_evaluation", "apply_evaluation_check"]


@dataclass(frozen=True)
class EvaluationCheck:
    """The objective's own statistic for base and fine-tuned samples, with standard errors, and the verdict."""

    statistic: str
    base: float
    base_se: float
    finetuned: float
    finetuned_se: float
    worse: bool
    base_validity: float = math.nan
    finetuned_validity: float = math.nan
    validity_worse: bool = False
    margin: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        text = (f"{self.statistic} of the fine-tuned samples {self.finetuned:.4g} +- {self.finetuned_se:.2g} "
                f"against the base model's {self.base:.4g} +- {self.base_se:.2g}")
        if self.validity_worse:
            text += (f"; valid samples {100 * self.finetuned_validity:.1f}% against the base model's "
                     f"{100 * self.base_validity:.1f}%")
        return text


def check_evaluation(
    base_rewards: np.ndarray,
    base_valid: np.ndarray,
    final_rewards: np.ndarray,
    final_valid: np.ndarray,
    tilt: Tilt,
    validity_drop: float = 0.05,
    margin: float = 0.0,
) -> EvaluationCheck:
    """Compare the objective's own statistic, and the fraction of valid samples, of the fine-tuned samples with
    the base bank's (module docstring). ``worse`` is set by either; ``margin``: the standard errors of the
    difference by which the statistic may fall below the base's (0: not at all)."""
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    base, base_se = tilt.statistic(base_rewards, base_valid)
    final, final_se = tilt.statistic(final_rewards, final_valid)
    allowed = margin * math.hypot(base_se, final_se)
    stat_worse = bool(final < base - allowed) if all(map(math.isfinite, (base, final, allowed))) else False
    p0, p1 = _validity(base_rewards, base_valid), _validity(final_rewards, final_valid)
    se = math.hypot(math.sqrt(p0 * (1 - p0) / max(len(base_valid), 1)), math.sqrt(p1 * (1 - p1) / max(len(final_valid), 1)))
    validity_worse = bool(p1 < p0 - validity_drop - 2.0 * se) if len(final_valid) else False
    return EvaluationCheck(tilt.name, base, base_se, final, final_se, stat_worse or validity_worse, p0, p1,
                           validity_worse, margin)


def _validity(rewards: np.ndarray, valid: np.ndarray) -> float:
    """Fraction of samples that are valid with a finite reward."""
    ok = np.asarray(valid, dtype=bool) & np.isfinite(np.asarray(rewards, dtype=np.float64))
    return float(ok.mean()) if ok.size else math.nan


def apply_evaluation_check(
    cfg: Config, out: Path, base_state: dict[str, torch.Tensor], base_bank: Bank, final_bank: Bank,
    tilt: Tilt, *, log: Callable[[str], None] = print,
) -> Bank:
    """Record :func:`check_evaluation` in ``out/checkpoint/model.pt``'s guard and act on it; returns the final bank.

    A rejected model (``worse``, with ``finetune.guard`` on) is set aside as ``checkpoint/model_rejected.pt`` and
    ``bank_rejected.parquet``; ``checkpoint/model.pt`` then holds ``base_state`` and the final bank is the first
    ``eval.size`` rows of the base bank (samples of the model kept). A rerun finds the decision made. Screened
    banks are left alone: their skipped rows have no reward, and their summary reports the certified tail.
    """
    model_path = out / "checkpoint" / "model.pt"
    rejected = model_path.with_name("model_rejected.pt")
    if base_bank.screened or final_bank.screened or rejected.is_file():
        return final_bank
    invalid_reward = cfg.objective.invalid_reward
    check = check_evaluation(*base_bank.scored(invalid_reward), *final_bank.scored(invalid_reward), tilt,
                             validity_drop=cfg.finetune.guard_validity_drop, margin=cfg.finetune.guard_eval_margin)
    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    guard = dict(blob.get("guard") or {})
    if guard.get("evaluation") == check.to_dict():
        return final_bank
    guard["evaluation"] = check.to_dict()
    if check.worse and cfg.finetune.guard:
        log(f"[guard] WARNING: {check.describe()}: keeping the base model (the fine-tuned one is in {rejected})")
        for path in (out / "bank_final.parquet", out / "bank_final.parquet.shards"):
            if path.exists():
                path.replace(out / path.name.replace("bank_final", "bank_rejected"))
        model_path.replace(rejected)
        _set_aside_lora(model_path.parent)
        below = f"by more than {check.margin:g} standard errors" if check.margin else "at all"
        guard.update(kept="base", reason=f"evaluation: {check.describe()}, below it {below} (finetune."
                     "guard_eval_margin; validity: by more than finetune.guard_validity_drop and two standard errors); "
                     "the base model is returned")
        blob = {**blob, "state_dict": base_state}
        final_bank = base_bank
        write_atomic(final_bank, out / "bank_final.parquet")
    tmp = model_path.with_suffix(".tmp")
    torch.save({**blob, "guard": guard}, tmp)
    tmp.replace(model_path)
    return final_bank


def _set_aside_lora(checkpoint: Path) -> None:
    """A rejected LoRA run's adapter files (``finetune.lora``) move to ``checkpoint/rejected/``: what stays in
    ``checkpoint/`` is the model kept."""
    names = ("adapter_model.safetensors", "adapter_config.json", "merged.safetensors")
    present = [checkpoint / name for name in names if (checkpoint / name).is_file()]
    if present:
        (checkpoint / "rejected").mkdir(exist_ok=True)
        for path in present:
            path.replace(checkpoint / "rejected" / path.name)
