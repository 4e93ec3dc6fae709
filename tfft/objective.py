"""The fine-tuning objective as one typed value: the tilt p* ∝ q exp(g / gamma) (DESIGN.md sections 3-6).

``Tilt(eta, side, alpha, kl_weight)`` holds what the pseudo-reward, the tilt weights, the target statistics and
threshold refinement need, and does those computations itself:

- g = (r - eta)_+ / alpha (right) or g = -(eta - r)_+ / alpha (left), gamma = ``kl_weight``;
- ``eta=None`` is the expected-reward objective g = r (side right, alpha 1: :meth:`Tilt.mean`);
- ``eta`` a tuple (eta*_0, ..., eta*_{C-1}) is one threshold per condition: row i uses eta*_{c_i}, and the pooled
  target is the mixture (1/C) sum_c p*_c (`tfft.conditions`).

The values are checked once, in the constructor, with `tfft.tail`'s checks (:meth:`Tilt.check` is the same rule
for a caller that validates settings before it has a threshold). :meth:`Tilt.to_dict` and :meth:`Tilt.from_dict`
are the JSON form ``{"eta", "side", "alpha", "kl_weight"}`` (eta a list per condition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from tfft.conditions import per_condition_weights, row_values
from tfft.pseudo import PseudoReward, pseudo_reward_signal
from tfft.bracket import TailMeasurement
from tfft.refine import RefineResult, RefineRound, refine_threshold
from tfft.tail import _as_float64, _as_mask, _check_alpha, _check_kl_weight, _check_side, var
from tfft.interval import TargetInterval, target_interval
from tfft.target import TailSummary, pseudo_reward, target_summary, tilt_weights

__all__ = ["Tilt"]

Eta = float | tuple[float, ...] | None


def _check_eta(eta: Any) -> Eta:
    """None, one finite float, or a non-empty tuple of finite floats (a list or array becomes a tuple)."""
    if eta is None:
        return None
    if isinstance(eta, (list, tuple, np.ndarray, torch.Tensor)):
        values = tuple(float(v) for v in (eta.tolist() if hasattr(eta, "tolist") else eta))
        if not values or not all(map(math.isfinite, values)):
            raise ValueError(f"eta: expected one threshold per condition, all finite, got {list(values)}")
        return values
    value = float(eta)
    if not math.isfinite(value):
        raise ValueError(f"eta: expected a finite threshold or None, got {value}")
    return value


@dataclass(frozen=True)
class Tilt:
    """The objective CVaR_alpha - gamma KL(p || q) at its threshold(s) (module docstring).

    Attributes:
        eta: None (expected reward), eta* (float), or eta*_c per condition (tuple of length C).
        side: ``"right"`` (upper tail) or ``"left"`` (lower tail).
        alpha: tail mass in (0, 1].
        kl_weight: gamma > 0.
    """

    eta: Eta
    side: str
    alpha: float
    kl_weight: float

    def __post_init__(self) -> None:
        side, alpha, kl_weight = Tilt.check(self.side, self.alpha, self.kl_weight)
        eta = _check_eta(self.eta)
        if eta is None and (side, alpha) != ("right", 1.0):
            raise ValueError(f"eta: None is the expected-reward objective (side 'right', alpha 1: Tilt.mean), "
                             f"got side {side!r}, alpha {alpha}")
        for name, value in (("eta", eta), ("side", side), ("alpha", alpha), ("kl_weight", kl_weight)):
            object.__setattr__(self, name, value)

    @staticmethod
    def check(side: str, alpha: float, kl_weight: float) -> tuple[str, float, float]:
        """The rule for side, alpha and gamma (`tfft.tail`'s): returns them (alpha, gamma as floats) or raises
        ``ValueError`` whose message starts with the offending name (``"alpha: ..."``)."""
        return _check_side(side), _check_alpha(alpha), _check_kl_weight(kl_weight)

    @classmethod
    def mean(cls, kl_weight: float) -> Tilt:
        """The expected-reward objective E_p[r] - gamma KL: g = r (side right, alpha 1, no threshold)."""
        return cls(None, "right", 1.0, kl_weight)

    # ----------------------------------------------------------------------------------------- what it is
    @property
    def is_mean(self) -> bool:
        """True for the expected-reward objective (no threshold)."""
        return self.eta is None

    @property
    def name(self) -> str:
        """``"mean"`` or e.g. ``"right-CVaR(0.1)"``: the objective's own statistic."""
        return "mean" if self.is_mean else f"{self.side}-CVaR({self.alpha:g})"

    def eta_for(self, condition: int) -> float | None:
        """The threshold of condition ``condition``: eta*_c of a per-condition tilt, else the one eta (or None)."""
        return self.eta[condition] if isinstance(self.eta, tuple) else self.eta

    def at(self, condition: int) -> Tilt:
        """The single-threshold tilt of one condition (its eta*_c; the tilt itself without per-condition eta)."""
        return replace(self, eta=self.eta_for(condition))

    def with_eta(self, eta: Eta) -> Tilt:
        """The same objective at another threshold (threshold refinement)."""
        return replace(self, eta=eta)

    def row_eta(self, cond: Any = None) -> Any:
        """The threshold of each row: the one eta (or None) whatever ``cond``; with per-condition thresholds
        eta*_{cond_i}, (n,), a float64 tensor on ``cond``'s device for a torch ``cond``, else a numpy array."""
        if isinstance(self.eta, tuple):
            if cond is None:
                raise ValueError("a per-condition tilt needs each row's condition index (cond)")
            return row_values(self.eta, cond)
        return self.eta

    def _one_eta(self, what: str) -> float | None:
        if isinstance(self.eta, tuple):
            raise ValueError(f"{what}: a per-condition tilt has one threshold per condition; use .at(condition)")
        return self.eta

    def _kwargs(self, what: str) -> dict[str, Any]:
        """``eta, side, alpha, kl_weight`` as `tfft.target`'s keyword arguments (one threshold)."""
        return {"eta": self._one_eta(what), "side": self.side, "alpha": self.alpha, "kl_weight": self.kl_weight}

    # ---------------------------------------------------------------------------------- pseudo-reward
    def pseudo_reward(self, rewards: Any, cond: Any = None) -> Any:
        """g(r) elementwise (`tfft.target.pseudo_reward`), each row at its condition's threshold when ``cond``
        (n,) is given; torch in, torch out."""
        return pseudo_reward(rewards, eta=self.row_eta(cond), side=self.side, alpha=self.alpha)

    def signal(
        self, rewards: torch.Tensor, grad_rewards: torch.Tensor, valid: torch.Tensor, cond: torch.Tensor | None = None,
        *, grad_clip: float = 0.0,
    ) -> PseudoReward:
        """g and grad g from r (n,), grad r (n, d) and validity (n,) (`tfft.pseudo.pseudo_reward_signal`), each row
        at its condition's threshold when ``cond`` (n,) is given; ``grad_clip`` caps each ||grad r||."""
        return pseudo_reward_signal(rewards, grad_rewards, valid, eta=self.row_eta(cond), side=self.side,
                                    alpha=self.alpha, grad_clip=grad_clip)

    # ------------------------------------------------------------------------------------ tilt weights
    def weights(self, rewards: Any, valid: Any = None, cond: Any = None, n_conditions: int | None = None) -> np.ndarray:
        """Self-normalised tilt weights w_i ∝ exp(g(r_i) / gamma), (N,); invalid or non-finite rows get 0.

        Without ``cond``: `tfft.target.tilt_weights`, summing to 1. With ``cond`` (N,) condition indices: each
        condition's rows are tilted at its own threshold and normalised to sum 1/C (the pooled target, the
        mixture of the per-condition tilts: `tfft.conditions.per_condition_weights`); C is ``n_conditions``, else
        the number of thresholds, else max(cond) + 1.
        """
        if cond is None:
            return tilt_weights(rewards, valid=valid, **self._kwargs("weights without cond"))
        r = _as_float64(rewards, "rewards")
        keep = np.ones(r.size, dtype=bool) if valid is None else _as_mask(valid, r.size)
        c = np.asarray(cond, dtype=np.int64).reshape(-1)
        if n_conditions is None:
            n_conditions = len(self.eta) if isinstance(self.eta, tuple) else (int(c.max()) + 1 if c.size else 0)
        w = np.zeros(r.size)
        for k in range(n_conditions):
            rows = np.flatnonzero((c == k) & keep)
            if rows.size:
                w[rows] = self.at(k).weights(r[rows], valid=np.ones(rows.size, dtype=bool))
        return per_condition_weights(w, c, n_conditions)

    def target_summary(self, rewards: Any, valid: Any = None, **kwargs: Any) -> TailSummary:
        """Statistics of the target from a base bank (`tfft.target.target_summary`; ``kwargs``: ``levels``)."""
        return target_summary(rewards, valid=valid, **self._kwargs("target_summary"), **kwargs)

    def target_interval(self, rewards: Any, valid: Any = None, **kwargs: Any) -> TargetInterval:
        """Bootstrap interval of the target statistics (`tfft.interval.target_interval`; ``kwargs``: ``levels``,
        ``n_boot``, ``confidence``, ``seed``)."""
        return target_interval(rewards, valid=valid, **self._kwargs("target_interval"), **kwargs)

    # ------------------------------------------------------------------------- the objective's statistic
    def statistic(self, rewards: Any, valid: Any = None) -> tuple[float, float]:
        """(value, standard error) of the objective's own statistic on the valid finite rewards: the mean of its
        influence function (:meth:`influence`), std / sqrt(n); NaN with fewer than two rewards."""
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        keep = np.isfinite(r) if valid is None else np.asarray(valid, dtype=bool) & np.isfinite(r)
        r = r[keep]
        if r.size < 2:
            return math.nan, math.nan
        phi = self.influence(r)
        return float(phi.mean()), float(phi.std(ddof=1) / math.sqrt(phi.size))

    def influence(self, rewards: Any) -> np.ndarray:
        """phi (n,) of finite rewards (n,), whose mean is the objective's own statistic: the rewards for the mean,
        for CVaR_alpha phi_i = q + (r_i - q)_+ / alpha (right; left: q - (q - r_i)_+ / alpha) at the empirical
        quantile q."""
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if self.is_mean:
            return r
        if self.side == "right":
            q = float(np.quantile(r, 1.0 - self.alpha))
            return q + np.maximum(r - q, 0.0) / self.alpha
        q = float(np.quantile(r, self.alpha))
        return q - np.maximum(q - r, 0.0) / self.alpha

    # ------------------------------------------------------------------------------ threshold refinement
    def measure(self, rewards: Any) -> TailMeasurement:
        """The tail mass beyond eta of finite rewards (n,) (right: the fraction r > eta; left: r < eta), with
        their alpha-VaR as the next threshold's proposal (`tfft.bracket.TailMeasurement`)."""
        eta = self._one_eta("measure")
        if eta is None:
            raise ValueError("measure: the expected-reward objective has no threshold")
        r = _as_float64(rewards, "rewards")
        mass = float(np.mean(r > eta) if self.side == "right" else np.mean(r < eta))
        return TailMeasurement(mass, int(r.size), var(r, side=self.side, alpha=self.alpha))

    def refine(
        self, measure: Callable[[float], TailMeasurement], *, rounds: int, step: float,
        bank_rewards: Sequence[float] | np.ndarray | None = None,
        on_round: Callable[[RefineRound], None] | None = None, on_warning: Callable[[str], None] | None = None,
    ) -> RefineResult:
        """Threshold refinement from this tilt's eta (`tfft.refine.refine_threshold`, DESIGN §5); with
        ``bank_rewards`` (the valid base-bank rewards) the left side's bracket starts as the basin of the bank's
        eta* at this tilt's gamma."""
        eta = self._one_eta("refine")
        if eta is None:
            raise ValueError("refine: the expected-reward objective has no threshold")
        return refine_threshold(measure, eta0=eta, side=self.side, alpha=self.alpha, rounds=rounds, step=step,
                                bank_rewards=bank_rewards, kl_weight=None if bank_rewards is None else self.kl_weight,
                                on_round=on_round,
                                on_warning=on_warning)

    # -------------------------------------------------------------------------------------- JSON form
    def to_dict(self) -> dict[str, Any]:
        """``{"eta", "side", "alpha", "kl_weight"}``; eta None, a float, or a list per condition."""
        eta = list(self.eta) if isinstance(self.eta, tuple) else self.eta
        return {"eta": eta, "side": self.side, "alpha": self.alpha, "kl_weight": self.kl_weight}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Tilt:
        """The inverse of :meth:`to_dict`; other keys (``summary.json``'s ``kind``) are ignored."""
        return cls(record["eta"], record["side"], record["alpha"], record["kl_weight"])
