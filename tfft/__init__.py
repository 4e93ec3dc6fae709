"""tfft: Tail-aware Flow Fine-Tuning as a plain library (torch and numpy only).

DESIGN.md sections: tail statistics and the threshold (§3, :mod:`tfft.tail`), pseudo-reward, tilt and
target statistics (§5, :mod:`tfft.target`) and their bootstrap interval (:mod:`tfft.interval`), the velocity
network and flow matching (:mod:`tfft.model`),
samplers (:mod:`tfft.sampling`), adjoint matching (§6, :mod:`tfft.adjoint`, :mod:`tfft.matching`, :mod:`tfft.conditioning`), the pseudo-reward signal
(:mod:`tfft.pseudo`), a user's model of any sample shape in the flat interface (:mod:`tfft.user_model`), a VP
diffusion network as a flow (:mod:`tfft.diffusion`), the solvers behind one ``step`` interface (§6-7,
:mod:`tfft.solvers`), the held-out check of weighted flow matching (:mod:`tfft.holdout`), the CUDA-graph captures of the sampler and the adjoint (:mod:`tfft.graphs`), the rule for
failed samples (:mod:`tfft.invalid`), the objective as one typed value (:mod:`tfft.objective`), screened reward
evaluation (:mod:`tfft.screen`) and conditions (class labels, prompts) as an optional ``cond`` axis
(:mod:`tfft.conditions`).
"""

from tfft.adjoint import (
    Adjoint,
    girsanov_kl,
    girsanov_kl_estimate,
    lean_adjoint,
    select_time_steps,
    step_weights,
)
from tfft.conditioning import Conditioning
from tfft.matching import adjoint_matching_loss, matching_loss
from tfft.conditions import call_velocity, per_condition_weights, row_values, uniform_conditions
from tfft.diffusion import VPDiffusionFlow
from tfft.graphs import GraphedAdjoint, GraphedSampler
from tfft.holdout import HoldOut, split_rows
from tfft.invalid import InvalidRule, TailBothWays, assign_invalid, tail_both_ways, tilt_rewards
from tfft.objective import Tilt
from tfft.pseudo import PseudoReward, pseudo_reward_signal
from tfft.basin import left_basin
from tfft.bracket import TailMeasurement
from tfft.refine import RefineResult, refine_threshold
from tfft.solvers import (
    AdjointMatchingConfig,
    AdjointMatchingSolver,
    StepResult,
    WeightedFlowMatchingSolver,
    oversample_weights,
)
from tfft.model import GaussianVelocity, VelocityMLP, flow_matching_loss
from tfft.user_model import FlatVelocity
from tfft.screen import ScreenResult, placeholder_rewards, screened_evaluate, wilson_upper
from tfft.sampling import Trajectory, sample_ode, sample_sde, sde_drift, time_grid
from tfft.tail import Threshold, cvar, solve_threshold, threshold_objective, var
from tfft.interval import TargetInterval, batched_cvar, target_interval
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
    "call_velocity",
    "per_condition_weights",
    "row_values",
    "uniform_conditions",
    "InvalidRule",
    "TailBothWays",
    "assign_invalid",
    "tail_both_ways",
    "tilt_rewards",
    "ScreenResult",
    "placeholder_rewards",
    "screened_evaluate",
    "wilson_upper",
    "Threshold",
    "TailSummary",
    "TargetInterval",
    "Tilt",
    "Trajectory",
    "VelocityMLP",
    "FlatVelocity",
    "VPDiffusionFlow",
    "GaussianVelocity",
    "adjoint_matching_loss",
    "Adjoint",
    "AdjointMatchingConfig",
    "AdjointMatchingSolver",
    "Conditioning",
    "GraphedAdjoint",
    "GraphedSampler",
    "HoldOut",
    "split_rows",
    "PseudoReward",
    "RefineResult",
    "TailMeasurement",
    "left_basin",
    "refine_threshold",
    "StepResult",
    "WeightedFlowMatchingSolver",
    "girsanov_kl",
    "girsanov_kl_estimate",
    "matching_loss",
    "oversample_weights",
    "pseudo_reward_signal",
    "sde_drift",
    "batched_cvar",
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
    "step_weights",
    "summarize",
    "target_interval",
    "target_summary",
    "threshold_objective",
    "tilt_log_weights",
    "tilt_weights",
    "time_grid",
    "var",
]
