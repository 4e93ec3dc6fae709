"""tfft: Tail-aware Flow Fine-Tuning as a plain library (torch and numpy only).

DESIGN.md sections: tail statistics and the threshold (§3, :mod:`tfft.tail`), pseudo-reward, tilt and
target statistics (§5, :mod:`tfft.target`), the velocity network and flow matching (:mod:`tfft.model`),
samplers (:mod:`tfft.sampling`), adjoint matching (§6, :mod:`tfft.adjoint`).
"""

from tfft.adjoint import adjoint_matching_loss, adjoint_matching_step, lean_adjoint, select_time_steps
from tfft.model import GaussianVelocity, VelocityMLP, flow_matching_loss
from tfft.sampling import Trajectory, sample_ode, sample_sde, time_grid
from tfft.tail import Threshold, cvar, solve_threshold, threshold_objective, var
from tfft.target import (
    TailSummary,
    effective_sample_size,
    pseudo_reward,
    pseudo_reward_grad_scale,
    summarize,
    target_summary,
    tilt_log_weights,
    tilt_weights,
)

__all__ = [
    "Threshold",
    "TailSummary",
    "Trajectory",
    "VelocityMLP",
    "GaussianVelocity",
    "adjoint_matching_loss",
    "adjoint_matching_step",
    "cvar",
    "effective_sample_size",
    "flow_matching_loss",
    "lean_adjoint",
    "pseudo_reward",
    "pseudo_reward_grad_scale",
    "sample_ode",
    "sample_sde",
    "select_time_steps",
    "solve_threshold",
    "summarize",
    "target_summary",
    "threshold_objective",
    "tilt_log_weights",
    "tilt_weights",
    "time_grid",
    "var",
]
