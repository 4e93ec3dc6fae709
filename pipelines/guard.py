"""A guard against divergence in fine-tuning: keep the best checkpoint, stop early when things collapse.

The adjoint solver reports the running objective E[g(X_1)] - gamma KL on its own training trajectories, the
quantity fine-tuning maximises (DESIGN §6). At every logged window the guard compares that window's mean with
the best so far and with the first window (the base model's value, KL = 0):

- the state of the best window is kept; at the end the last state is returned unless it is worse than the best
  by more than two standard errors of the window means (then the best is returned, and the summary says so);
- when no window beat the base model's objective by two standard errors (``margin``), the starting state is
  returned: a fine-tuned model never silently ends worse than its start;
- training stops early when the validity of the training samples falls below ``min_valid_fraction``, or when
  the objective has stayed below its start by more than two standard errors for ``patience`` windows.

The weighted solver has no running objective. With ``finetune.holdout_fraction`` > 0 (off by default: on the
molecule configs the held-out gain stays negative while the tail improves, README "The guard") its anchored form
holds that fraction of the bank out of training and reports the held-out gain L(base) - L(model) of its loss
(`tfft.holdout`; 0 at the base, positive when the model is closer to the tilted target): the guard follows that
gain the same way, with 0 as the start, except that the best window need only beat 0 (``margin`` 0: the gain's
standard error spans the held-out rows' spread of tilts and is wide; a margin of two would return the base after
most runs that did improve). Without held-out rows this guard keeps the last state. For every solver the
evaluation check (`pipelines.eval_guard`) then compares the fine-tuned samples with the base bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Guard", "GuardDecision"]


@dataclass(frozen=True)
class GuardDecision:
    """What the guard says after a window: whether this window is the best so far, and whether to stop."""

    improved: bool
    stop: bool
    reason: str = ""


@dataclass
class Guard:
    """Tracks the windows' running objective (mean and standard error) and validity.

    Attributes:
        enabled: False: never stops, keeps the last state.
        min_valid_fraction: stop when a window's valid fraction is below this (0: never).
        patience: stop after this many consecutive windows below the start (0: never).
        baseline: the base model's objective E_q[g] (KL = 0), e.g. from the bank: the start to compare with;
            None: the first window.
        margin: the standard errors by which the best window must beat ``baseline`` for a fine-tuned state to
            be kept (0: it must beat it at all; the held-out gain, whose standard error across held-out rows is
            wide next to the windows' training statistics).
    """

    enabled: bool = True
    metric: str = "running objective"
    min_valid_fraction: float = 0.0
    patience: int = 5
    baseline: float | None = None
    margin: float = 2.0
    first: tuple[float, float] | None = None
    best: tuple[float, float, int] | None = None  # (mean, se, step)
    last: tuple[float, float, int] | None = None
    below: int = 0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, step: int, objective: float | None, se: float, valid_fraction: float) -> GuardDecision:
        """Record one window (``objective`` None: the solver has none) and decide."""
        if not self.enabled or objective is None or not math.isfinite(objective):
            return GuardDecision(improved=False, stop=False)
        se = se if math.isfinite(se) else 0.0
        self.last = (objective, se, step)
        if self.first is None:
            self.first = (objective, se) if self.baseline is None else (self.baseline, 0.0)
        improved = self.best is None or objective > self.best[0]
        if improved:
            self.best = (objective, se, step)
        margin = 2.0 * math.hypot(se, self.first[1])
        self.below = self.below + 1 if objective < self.first[0] - margin else 0
        if self.min_valid_fraction > 0 and valid_fraction < self.min_valid_fraction:
            self.stopped = (
                f"validity {valid_fraction:.3f} of the training samples fell below the floor {self.min_valid_fraction:.3f}"
            )
        elif self.patience > 0 and self.below >= self.patience:
            self.stopped = (
                f"the {self.metric} stayed below its start ({self.first[0]:.4g}) for {self.below} windows"
            )
        return GuardDecision(improved=improved, stop=bool(self.stopped), reason=self.stopped)

    def keep(self) -> tuple[str, str]:
        """("base" | "best" | "last", why) for the state to return at the end.

        "base": no window beat the base model's objective (``baseline``) by two standard errors, so the
        fine-tuned state is not known to be better than the model it started from, and the start is returned.
        """
        if not self.enabled or self.best is None or self.last is None:
            return "last", "no running objective to compare" if self.enabled else "guard off"
        best, best_se, best_step = self.best
        last, last_se, last_step = self.last
        if self.baseline is not None and best <= self.baseline + self.margin * best_se:
            by = f"by {self.margin:g} standard errors" if self.margin else "at all"
            return "base", (
                f"no window's {self.metric} beat the base model's {self.baseline:.4g} {by} "
                f"(best {best:.4g} +- {best_se:.2g} at step {best_step}); the starting state is returned"
            )
        if self.stopped:
            return "best", f"stopped early ({self.stopped}); kept step {best_step}, {self.metric} {best:.4g}"
        if last < best - 2.0 * math.hypot(best_se, last_se):
            return "best", (
                f"the last {self.metric} {last:.4g} (step {last_step}) is more than two standard errors below the best "
                f"{best:.4g} (step {best_step})"
            )
        return "last", f"the last {self.metric} {last:.4g} is within two standard errors of the best {best:.4g}"

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (for checkpoints)."""
        return {"first": self.first, "best": self.best, "last": self.last, "below": self.below, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.first = tuple(state["first"]) if state.get("first") else None  # type: ignore[assignment]
        self.best = tuple(state["best"]) if state.get("best") else None  # type: ignore[assignment]
        self.last = tuple(state["last"]) if state.get("last") else None  # type: ignore[assignment]
        self.below = int(state.get("below", 0))
        self.stopped = str(state.get("stopped", ""))
