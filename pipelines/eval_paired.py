"""The guard's paired evaluation check (``finetune.guard_paired_size``): base and fine-tuned samples with common noise.

The plain check (`pipelines.eval_guard.check_evaluation`) compares two independent samples, the final bank and
the base bank; the standard error of the difference of their statistics is sqrt(se_b^2 + se_f^2), and a model
close to its base passes or fails by that noise. Here the evaluation stage draws N samples per condition of
each model with one noise per row (`pipelines.sampler_actor.row_noise`: the same start point and Brownian
increments for row i of both banks), so that row i of the two banks differ only by the models' drifts. Each
statistic is the mean of its influence function phi (`tfft.objective.Tilt.influence`) over the rows valid in both
banks, and the difference is the mean of the paired differences:

    D = mean_i (phi_f,i - phi_b,i),     se(D) = std_i(phi_f,i - phi_b,i) / sqrt(m),

far smaller than the unpaired error when the rewards of one noise are correlated (on alanine dipeptide's right
tail 0.025-0.05 against 0.31-0.39 for 1,000 samples: ``benchmarks/results/paired_check.md``). With one threshold
per condition D is the mean over conditions of each condition's, se(D) = sqrt(sum_c se_c^2) / C. The valid
fractions compare all rows of the two banks, as in the plain check.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.bankio import Bank
from pipelines.eval_guard import EvaluationCheck, mean_over_conditions, validity_loss
from tfft.objective import Tilt

__all__ = ["check_paired", "paired_statistics", "NOISE_KEY"]

NOISE_KEY = "guard-paired"  # the row-noise key both check banks share


def check_paired(
    base: Bank, final: Bank, tilt: Tilt, *, invalid_reward: float | None = None, validity_drop: float = 0.05,
    margin: float = 0.0,
) -> EvaluationCheck:
    """The paired check of two banks with the same ids and common noise (module doc); ``worse`` when D is below
    -``margin`` se(D) (0: below zero at all), or when the valid fraction dropped (`validity_loss`)."""
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    ob, of = np.argsort(base.ids, kind="stable"), np.argsort(final.ids, kind="stable")
    if not np.array_equal(base.ids[ob], final.ids[of]):
        raise ValueError("the paired check needs two banks of the same ids (rows drawn with common noise)")
    (rb, vb), (rf, vf) = (bank.scored(invalid_reward) for bank in (base, final))
    rb, vb, rf, vf = rb[ob], vb[ob], rf[of], vf[of]
    both = vb & vf & np.isfinite(rb) & np.isfinite(rf)
    per_condition = base.cond is not None and not isinstance(tilt.eta, float)
    groups = [base.cond[ob] == c for c in range(int(base.cond.max()) + 1)] if per_condition else [np.ones_like(both)]
    parts = [paired_statistics(tilt, rb[g & both], rf[g & both]) for g in groups]
    (stat_b, se_b), (stat_f, se_f), (diff, se_d) = (mean_over_conditions([p[k] for p in parts]) for k in range(3))
    stat_worse = bool(diff < -margin * se_d) if all(map(math.isfinite, (diff, se_d))) else False
    p0, p1, validity_worse = validity_loss((rb, vb), (rf, vf), validity_drop)
    per = (tuple(p[0][0] for p in parts), tuple(p[1][0] for p in parts)) if per_condition else ((), ())
    return EvaluationCheck(tilt.name, stat_b, se_b, stat_f, se_f, stat_worse or validity_worse, p0, p1, validity_worse,
                           margin, per[0], per[1], rows="paired", paired_n=int(both.sum()), difference_se=se_d)


def paired_statistics(tilt: Tilt, rb: np.ndarray, rf: np.ndarray) -> tuple[tuple[float, float], ...]:
    """((S_b, se_b), (S_f, se_f), (D, se(D))) of paired finite rewards rb, rf (m,) (row i of both drawn with one
    noise): each statistic the mean of its influence function (`tfft.objective.Tilt.influence`), D = S_f - S_b the
    mean of the paired differences, every error std / sqrt(m); NaN with fewer than two pairs."""
    m = rb.size
    if m < 2:
        return ((math.nan, math.nan),) * 3
    pb, pf = tilt.influence(rb), tilt.influence(rf)
    root = math.sqrt(m)
    return tuple((float(phi.mean()), float(phi.std(ddof=1) / root)) for phi in (pb, pf, pf - pb))
