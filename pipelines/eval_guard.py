"""The guard's last check, on the evaluation: the fine-tuned model must not end below its base on its own statistic.

The in-training guard (`pipelines.guard`) watches a running metric; the weighted solver has none, and a running
metric can miss what the evaluation then shows. After the evaluation bank, the objective's own statistic
(right-CVaR_alpha, left-CVaR_alpha, or the mean for the expected-reward objective) of the fine-tuned samples is
compared with the base bank's. Both are means of an influence function, so each has a standard error
(`tfft.objective.Tilt.statistic`):

    right:  CVaR+ = mean(phi),  phi_i = q + (r_i - q)_+ / alpha,  q the (1 - alpha)-quantile;
    left:   CVaR- = mean(phi),  phi_i = q - (q - r_i)_+ / alpha,  q the alpha-quantile;
    mean:   phi_i = r_i;        se = std(phi) / sqrt(n).

With conditions and one threshold per condition (or the expected reward), the objective is the mean over the C
conditions of each condition's statistic, and so is the check's: S = (1/C) sum_c S_c, se = sqrt(sum_c se_c^2) / C
(each condition's rows of the base bank against its rows of the evaluation bank; ``EvaluationCheck`` records the
S_c). With one pooled threshold (``objective.per_condition: false``) the statistic is the pooled one.

A screened bank (``reward.screen``) scored the expensive reward on its certified tail and on a random audit only:
its statistic is exact from the working view when the certified tail covers the objective's alpha-tail, and
otherwise comes from the audit; its valid fraction always comes from the audit (`pipelines.screen_stats.check_rows`).

With ``finetune.guard_paired_size`` the evaluation stage makes the check on its own samples of both models, drawn
with common noise and compared pairwise (`pipelines.eval_paired.check_paired`), and passes it here.

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

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bankio import Bank, write_atomic
from pipelines.schema import Config
from pipelines.screen_stats import check_rows
from pipelines.screening import record_path
from tfft.objective import Tilt

__all__ = ["EvaluationCheck", "check_evaluation", "objective_statistic", "mean_over_conditions", "validity_loss",
           "apply_evaluation_check", "kept_base"]


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
    base_per_condition: tuple[float, ...] = ()
    finetuned_per_condition: tuple[float, ...] = ()
    rows: str = ""
    paired_n: int = 0
    difference_se: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        over = f" (mean over {len(self.base_per_condition)} conditions)" if self.base_per_condition else ""
        text = (f"{self.statistic}{over} of the fine-tuned samples {self.finetuned:.4g} +- {self.finetuned_se:.2g} "
                f"against the base model's {self.base:.4g} +- {self.base_se:.2g}")
        if self.paired_n:
            text += (f" (paired over {self.paired_n} samples with common noise: difference "
                     f"{self.finetuned - self.base:+.3g} +- {self.difference_se:.2g})")
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
    *,
    base_cond: np.ndarray | None = None,
    final_cond: np.ndarray | None = None,
    base_validity: tuple[np.ndarray, np.ndarray] | None = None,
    final_validity: tuple[np.ndarray, np.ndarray] | None = None,
) -> EvaluationCheck:
    """Compare the objective's own statistic, and the fraction of valid samples, of the fine-tuned samples with
    the base bank's (module docstring). ``worse`` is set by either; ``margin``: the standard errors of the
    difference by which the statistic may fall below the base's (0: not at all). ``base_cond``/``final_cond``:
    the rows' condition indices (n,) of conditional banks (:func:`objective_statistic`). ``base_validity``/
    ``final_validity``: other (rewards, mask) rows for the valid fractions (a screened bank's audit)."""
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if (base_cond is None) != (final_cond is None):
        raise ValueError("base_cond and final_cond: pass both (conditional banks) or neither")
    count = 0 if base_cond is None else int(max(np.max(base_cond, initial=-1), np.max(final_cond, initial=-1))) + 1
    base, base_se, base_per = objective_statistic(tilt, base_rewards, base_valid, base_cond, count)
    final, final_se, final_per = objective_statistic(tilt, final_rewards, final_valid, final_cond, count)
    difference_se = math.hypot(base_se, final_se)
    allowed = margin * difference_se
    stat_worse = bool(final < base - allowed) if all(map(math.isfinite, (base, final, allowed))) else False
    p0, p1, validity_worse = validity_loss(base_validity or (base_rewards, base_valid),
                                           final_validity or (final_rewards, final_valid), validity_drop)
    return EvaluationCheck(tilt.name, base, base_se, final, final_se, stat_worse or validity_worse, p0, p1,
                           validity_worse, margin, base_per, final_per, difference_se=difference_se)


def validity_loss(base: tuple[np.ndarray, np.ndarray], final: tuple[np.ndarray, np.ndarray],
                  validity_drop: float) -> tuple[float, float, bool]:
    """(p0, p1, worse): the valid fractions of base and final (rewards, mask) rows, and whether p1 is below p0
    by more than ``validity_drop`` plus two binomial standard errors of the difference."""
    (r0, v0), (r1, v1) = base, final
    p0, p1 = _validity(r0, v0), _validity(r1, v1)
    se = math.hypot(math.sqrt(p0 * (1 - p0) / max(len(v0), 1)), math.sqrt(p1 * (1 - p1) / max(len(v1), 1)))
    return p0, p1, bool(p1 < p0 - validity_drop - 2.0 * se) if len(v1) else False


def objective_statistic(
    tilt: Tilt, rewards: np.ndarray, valid: np.ndarray, cond: np.ndarray | None = None, count: int = 0,
) -> tuple[float, float, tuple[float, ...]]:
    """(S, se, (S_c)): the objective's own statistic (`tfft.objective.Tilt.statistic`) of rewards (n,) under the
    mask valid (n,). With condition indices cond (n,) in [0, count) and a tilt with one threshold per condition
    (or the expected reward), S = (1/C) sum_c S_c and se = sqrt(sum_c se_c^2) / C, C = count; a condition without
    two valid rewards makes S NaN. Otherwise the pooled statistic and no S_c."""
    if cond is None or count == 0 or isinstance(tilt.eta, float):
        value, se = tilt.statistic(rewards, valid)
        return value, se, ()
    cond = np.asarray(cond)
    per = [tilt.statistic(rewards[cond == c], valid[cond == c]) for c in range(count)]
    value, se = mean_over_conditions(per)
    return value, se, tuple(float(v) for v, _ in per)


def mean_over_conditions(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """(S, se) of the mean of C independent (S_c, se_c): S = (1/C) sum_c S_c, se = sqrt(sum_c se_c^2) / C."""
    return float(np.mean([v for v, _ in parts])), float(math.sqrt(sum(e * e for _, e in parts)) / len(parts))


def _validity(rewards: np.ndarray, valid: np.ndarray) -> float:
    """Fraction of samples that are valid with a finite reward."""
    ok = np.asarray(valid, dtype=bool) & np.isfinite(np.asarray(rewards, dtype=np.float64))
    return float(ok.mean()) if ok.size else math.nan


def apply_evaluation_check(
    cfg: Config, out: Path, base_state: dict[str, torch.Tensor], base_bank: Bank, final_bank: Bank,
    tilt: Tilt, *, log: Callable[[str], None] = print, model_dir: Path | None = None,
    check: EvaluationCheck | None = None,
) -> Bank:
    """Record :func:`check_evaluation` in the final model's checkpoint (``model_dir/checkpoint/model.pt``,
    ``model_dir`` = ``out`` unless threshold refinement's last round holds the final model) and act on it;
    returns the final bank.

    A rejected model (``worse``, with ``finetune.guard`` on) is set aside as ``checkpoint/model_rejected.pt`` and
    ``out/bank_rejected.parquet``; ``checkpoint/model.pt`` then holds ``base_state`` and the final bank is the base
    bank itself (samples of the model kept). A rerun finds the decision made. A screened bank's statistic comes
    from its certified tail, or from its audit where that tail does not cover the objective's
    (`pipelines.screen_stats.check_rows`; ``EvaluationCheck.rows`` says which). ``check``: a check already made
    (the paired one, `pipelines.eval_paired.check_paired`) instead of :func:`check_evaluation` on the two banks.
    """
    model_path = (out if model_dir is None else model_dir) / "checkpoint" / "model.pt"
    rejected = model_path.with_name("model_rejected.pt")
    if rejected.is_file():
        return final_bank
    check = check or _check(cfg, base_bank, final_bank, tilt)
    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    guard = dict(blob.get("guard") or {})
    if guard.get("evaluation") == check.to_dict():
        return final_bank
    guard["evaluation"] = check.to_dict()
    if check.worse and cfg.finetune.guard:
        log(f"[guard] WARNING: {check.describe()}: keeping the base model (the fine-tuned one is in {rejected})")
        for path in sorted(out.glob("bank_final*")):  # the bank, its shards, a screened bank's record and journal
            path.replace(out / path.name.replace("bank_final", "bank_rejected", 1))
        model_path.replace(rejected)
        _set_aside_lora(model_path.parent)
        below = f"by more than {check.margin:g} standard errors" if check.margin else "at all"
        guard.update(kept="base", reason=f"evaluation: {check.describe()}, below it {below} (finetune."
                     "guard_eval_margin; validity: by more than finetune.guard_validity_drop and two standard errors); "
                     "the base model is returned")
        blob = {**blob, "state_dict": base_state}
        final_bank = base_bank
        write_atomic(final_bank, out / "bank_final.parquet")
        if final_bank.screening is not None:
            record_path(out / "bank_final.parquet").write_text(json.dumps(final_bank.screening, indent=2))
    tmp = model_path.with_suffix(".tmp")
    torch.save({**blob, "guard": guard}, tmp)
    tmp.replace(model_path)
    return final_bank


def _check(cfg: Config, base_bank: Bank, final_bank: Bank, tilt: Tilt) -> EvaluationCheck:
    """:func:`check_evaluation` on the rows each bank can give (`pipelines.screen_stats.check_rows`)."""
    invalid_reward, conditional = cfg.objective.invalid_reward, base_bank.cond is not None and final_bank.cond is not None
    (base, base_valid, base_from), (final, final_valid, final_from) = (
        check_rows(bank, *bank.scored(invalid_reward), side=tilt.side, alpha=tilt.alpha,
                   tolerance=cfg.reward.screen.tolerance) for bank in (base_bank, final_bank))
    check = check_evaluation(*base, *final, tilt, validity_drop=cfg.finetune.guard_validity_drop,
                             margin=cfg.finetune.guard_eval_margin, base_cond=base_bank.cond if conditional else None,
                             final_cond=final_bank.cond if conditional else None, base_validity=base_valid,
                             final_validity=final_valid)
    screened = base_bank.screened or final_bank.screened
    return replace(check, rows=f"base: {base_from}; fine-tuned: {final_from}") if screened else check


def kept_base(model_dir: Path) -> bool:
    """True when :func:`apply_evaluation_check` has set the model in ``model_dir/checkpoint`` aside for its base."""
    return (model_dir / "checkpoint" / "model_rejected.pt").is_file()


def _set_aside_lora(checkpoint: Path) -> None:
    """A rejected LoRA run's adapter files (``finetune.lora``) move to ``checkpoint/rejected/``: what stays in
    ``checkpoint/`` is the model kept."""
    names = ("adapter_model.safetensors", "adapter_config.json", "merged.safetensors")
    present = [checkpoint / name for name in names if (checkpoint / name).is_file()]
    if present:
        (checkpoint / "rejected").mkdir(exist_ok=True)
        for path in present:
            path.replace(checkpoint / "rejected" / path.name)
