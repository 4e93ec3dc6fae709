"""The two fine-tuning solvers behind one interface: ``solver.step(n, generator) -> StepResult``.

- `AdjointMatchingSolver` (DESIGN.md section 6), for rewards with gradients: fresh SDE trajectories of the current
  model, the pseudo-reward gradient at X_1, the lean adjoint with the base drift, the conditioned regression.
- `WeightedFlowMatchingSolver` (DESIGN.md section 7), for rewards without gradients: flow matching on bank
  samples drawn by the frozen tilt weights w_i ∝ exp(g(x_i) / gamma).

A step returns the loss (attached to the model's parameters) and detached diagnostics as 0-dim tensors, so that
a training loop can accumulate them without a host synchronisation and all-reduce them in one call. The caller
owns the optimiser, gradient clipping and distribution. The adjoint solver's sampler and adjoint loops (CUDA graphs
or eager) are `tfft.solver_loops`, its evaluations at the loss's time steps `tfft.chosen_steps`, its diagnostics
`tfft.solver_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from tfft.conditions import call_velocity
from tfft.adjoint import select_time_steps
from tfft.chosen_steps import adjoint_at_steps, model_at_steps
from tfft.conditioning import Conditioning
from tfft.matching import LossTerms, chunked_matching_backward, matching_loss, zero_loss
from tfft.model import VelocityField
from tfft.oversample import oversample_weights
from tfft.pseudo import PseudoReward
from tfft.sampling import Trajectory, check_sde_arguments, sigma, velocity_gain
from tfft.solver_loops import SolverLoops
from tfft.solver_metrics import step_metrics
from tfft.step import StepResult
from tfft.weighted import WeightedFlowMatchingSolver

__all__ = [
    "AdjointMatchingConfig",
    "AdjointMatchingSolver",
    "StepResult",
    "WeightedFlowMatchingSolver",
    "oversample_weights",
    "path_log_weights",
]

PseudoRewardFn = Callable[..., PseudoReward]
"""``fn(x1 (n, d)) -> PseudoReward``: g, grad g and validity at the trajectories' end points; with conditions it
is called as ``fn(x1, cond)``, cond (n,) the trajectories' condition indices (per-row threshold and reward)."""


@dataclass(frozen=True)
class AdjointMatchingConfig:
    """Settings of `AdjointMatchingSolver`.

    Attributes:
        kl_weight: gamma > 0.
        steps: K, SDE steps of the training trajectories (use the bank's sampler's K).
        offset: the SDE's offset h (None: 1/K).
        late_fraction, n_early: the loss's time steps (`select_time_steps`).
        normalize: per-step normalisation of the regression (`Conditioning`); off by default: it shifts the
            gradient's weight to the last steps and slowed fine-tuning on the 2-D task.
        clip_quantile, clip_factor: per-sample target clip at clip_factor times this running quantile of the
            non-zero targets (clip_quantile 0: off).
        decay: decay of the running statistics.
        oversample: draw ``oversample * n`` trajectories and keep every active one (up to half the batch) and
            a random subset of the inactive ones, Horvitz-Thompson weighted (1 = off; `oversample_weights`).
        fast: the fast path (same loss and gradients as the reference, tested): the adjoint runs only on
            trajectories whose terminal adjoint is non-zero (the others' is zero at every step), their base
            velocity is evaluated only at the chosen steps; without oversampling, the loss reuses the sampler's
            own network evaluations at the chosen steps (kept attached) instead of calling the network again; on
            CUDA the sampler and the adjoint loops are CUDA graphs (`tfft.graphs`). False: the reference
            (every trajectory through the adjoint, a separate loss forward, eager loops).
        loss_chunk: evaluate and backpropagate the loss this many chosen time steps at a time
            (`tfft.matching.chunked_matching_backward`: same gradient, the activations of ``loss_chunk * n`` rows
            alive at once instead of ``m * n``: the memory of a large model's step). The step then returns a
            backpropagated `StepResult` (call ``result.backward()``, a no-op). 0: one loss over every chosen step.
        adjoint_chunk: the lean adjoint's vector-Jacobian products this many trajectories at a time (same
            numbers; the activations of ``adjoint_chunk`` rows alive instead of the batch's). 0: all at once.
        autocast: run every network call (sampler, adjoint VJPs, loss) under ``torch.autocast`` with this dtype
            (e.g. ``torch.bfloat16``; None: full precision). The SDE state, the adjoint and the regression stay in
            the trajectory's dtype. Measured on the closed-form test (`tests/tfft/test_adjoint.py`): see the README.
        reweight: weight each trajectory's loss by the path likelihood ratio dP*/dP_theta ∝ exp(g(X_K) / gamma)
            dq/dp_theta (`path_log_weights`, self-normalised over the batch), so that each step's regression
            target is the optimal control E_{P*}[-sigma_k a_{k+1} | X_k] itself, not the current model's one-step
            improvement E_{P_theta}[...]. Without it, a right tail (whose active region gains mass under the tilt)
            makes the on-policy iteration self-reinforcing: it creeps up, overshoots and oscillates around the
            target (``benchmarks/results/right_tail_ablation.md``). At the optimum the ratio is 1, so the weights
            cost nothing there; one extra no-grad base call per step and trajectory.
    """

    kl_weight: float
    steps: int
    offset: float | None = None
    late_fraction: float = 0.25
    n_early: int = 10
    normalize: bool = False
    clip_quantile: float = 0.9
    clip_factor: float = 2.0
    decay: float = 0.9
    oversample: int = 1
    fast: bool = True
    loss_chunk: int = 0
    adjoint_chunk: int = 0
    autocast: torch.dtype | None = None
    reweight: bool = False

    def __post_init__(self) -> None:
        if not self.kl_weight > 0:
            raise ValueError(f"kl_weight must be > 0, got {self.kl_weight}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if self.adjoint_chunk < 0:
            raise ValueError(f"adjoint_chunk must be >= 0, got {self.adjoint_chunk}")
        if self.oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")


@torch.no_grad()
def path_log_weights(base: VelocityField, traj: Trajectory, noise: Tensor) -> Tensor:
    """log dq/dp_theta of each sampled path (up to a constant), (n,) float64 (Girsanov, discrete and exact).

    Step k of the sampler is X_{k+1} = X_k + h b_theta + sqrt(h) sigma_k eps_k with b_theta - b_base = sigma_k u_k,
    u_k = (lambda_k / sigma_k)(v_theta - v_base)(X_k, t_k); under the base chain the same step needs the increment
    eps_k + sqrt(h) u_k, so the ratio of the two Gaussian step densities gives

        log dq/dp_theta = -sum_k [ sqrt(h) u_k . eps_k + h ||u_k||^2 / 2 ].

    Args:
        base: v_base.
        traj: the sampled trajectory with its recorded velocities (K, n, d).
        noise: the increments eps it was sampled with, (K, n, d).
    """
    if traj.velocities is None:
        raise ValueError("the trajectory has no recorded velocities")
    steps, n, d = traj.velocities.shape
    x = traj.xs[:-1].reshape(steps * n, d)
    t = traj.ts[:-1].repeat_interleave(n)
    cond = None if traj.cond is None else traj.cond.repeat(steps)
    v_base = call_velocity(base, x, t, cond).reshape(steps, n, d)
    gain = (velocity_gain(traj.ts[:-1], traj.offset) / sigma(traj.ts[:-1], traj.offset)).reshape(-1, 1, 1)
    u = (gain * (traj.velocities - v_base)).to(torch.float64)
    eps = noise.to(torch.float64)
    return -((traj.h**0.5) * (u * eps).sum(dim=(0, 2)) + 0.5 * traj.h * u.pow(2).sum(dim=(0, 2)))


class AdjointMatchingSolver:
    """Adjoint Matching with the conditioned regression (DESIGN.md section 6).

    Args:
        model: v_theta (trained; may be a DDP wrapper).
        base: v_base (frozen).
        pseudo_reward_fn: x1 (n, d) -> `PseudoReward` (e.g. `tfft.pseudo.pseudo_reward_signal` of the reward).
        config: `AdjointMatchingConfig`.

    ``step`` metrics (means over the batch's valid samples, with the oversampling weights):
        loss, loss_at_base (its value at v_theta = v_base; the ratio of the two, summed over a window, shows
        progress: the loss value itself is mostly irreducible noise), delta_v (||v_theta - v_base||^2), max_share
        (largest per-sample share of the loss), loss_ess (effective sample size of the per-sample losses),
        clipped_fraction, valid_fraction, active_fraction (of the pool), mean_reward, pseudo_reward (E g),
        kl (Girsanov, estimated on the loss's time steps: `girsanov_kl_estimate`), objective (E g - gamma KL:
        what fine-tuning maximises), batch (trajectories in the loss).
    """

    def __init__(
        self, model: VelocityField, base: VelocityField, pseudo_reward_fn: PseudoRewardFn, config: AdjointMatchingConfig
    ) -> None:
        self.model, self.base, self.pseudo_reward_fn, self.config = model, base, pseudo_reward_fn, config
        self.conditioning = Conditioning(
            config.steps, normalize=config.normalize, clip_quantile=config.clip_quantile,
            clip_factor=config.clip_factor, decay=config.decay,
        )
        self._loops = SolverLoops(model, base, steps=config.steps, offset=config.offset, fast=config.fast,
                                  adjoint_chunk=config.adjoint_chunk)

    def step(self, x0: Tensor, generator: torch.Generator | None = None, cond: Tensor | None = None) -> StepResult:
        """One loss on fresh trajectories (`_step`), under autocast when ``config.autocast`` is set."""
        if self.config.autocast is None:
            return self._step(x0, generator, cond)
        with torch.autocast(device_type=x0.device.type, dtype=self.config.autocast):
            return self._step(x0, generator, cond)

    def _step(self, x0: Tensor, generator: torch.Generator | None = None, cond: Tensor | None = None) -> StepResult:
        """One loss on fresh trajectories started at x0 (n, d) (``oversample * n`` rows when oversampling).

        Draw order with a generator: the loss's time steps, the Brownian increments (K, n, d), then the
        oversampling draws; the same generator state gives the same loss on the fast and the reference path.
        ``cond`` (n,): the trajectories' condition indices (the caller draws them, e.g.
        `tfft.conditions.uniform_conditions`); every network call and the pseudo-reward get them. With
        conditions the sampler and the adjoint run eagerly (no CUDA graphs: the captures are unconditional).
        """
        cfg = self.config
        check_sde_arguments(x0, cfg.steps, cfg.offset)
        indices = select_time_steps(cfg.steps, late_fraction=cfg.late_fraction, n_early=cfg.n_early, generator=generator)
        indices = indices.to(x0.device)
        noise = torch.randn((cfg.steps, *x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
        if cond is not None:
            cond = cond.to(device=x0.device, dtype=torch.long)
        chunked = cfg.loss_chunk > 0 and torch.is_grad_enabled()
        reuse = (cfg.fast and cfg.oversample == 1 and not chunked and (not self._loops.graphs(x0) or cond is not None)
                 and torch.is_grad_enabled())
        traj = self._loops.sample(x0, noise, indices if reuse else None, cond)
        n_pool = x0.shape[0]
        signal = self._signal(traj, cond, n_pool)
        device, dtype = traj.xs.device, traj.xs.dtype
        valid = signal.valid.to(device=device, dtype=torch.bool)
        active = signal.active.to(device=device)
        weights = self._pool_weights(valid, active, n_pool, generator)
        keep = torch.nonzero(weights > 0).flatten().to(device)
        if keep.numel() == 0:
            return self._empty_step(valid, active, x0)
        w = weights.to(device=device, dtype=dtype)[keep]
        sub = traj.subset(keep)
        loss_w = self._loss_weights(signal, sub, keep, w, noise)
        terminal = -signal.grad.to(device=device, dtype=dtype)[keep] / cfg.kl_weight
        next_adjoint, v_base = adjoint_at_steps(self._loops, sub, terminal, indices, capacity=n_pool, fast=cfg.fast)
        terms = self._loss_terms(sub, indices, v_base, next_adjoint, loss_w, chunked)
        metrics = step_metrics(signal, sub, keep, w, v_base, indices, terms, valid, active, kl_weight=cfg.kl_weight,
                               steps=cfg.steps, late_fraction=cfg.late_fraction)
        metrics["path_ess"] = loss_w.sum().pow(2) / loss_w.pow(2).sum().clamp_min(1e-300) / w.sum().pow(2) * w.pow(2).sum()
        return StepResult(terms.loss, metrics, backpropagated=chunked)

    def _signal(self, traj: Trajectory, cond: Tensor | None, n_pool: int) -> PseudoReward:
        """The pseudo-reward at the end points X_K (n_pool, d) of a copy, with cond (n_pool,) when conditioned;
        its grad must be (n_pool, d) and its validity (n_pool,)."""
        x1 = traj.x1.detach().clone()
        signal = self.pseudo_reward_fn(x1) if cond is None else self.pseudo_reward_fn(x1, cond)
        if signal.grad.shape != traj.x1.shape or signal.valid.shape != (n_pool,):
            raise ValueError(
                f"pseudo_reward_fn must return grad (n, d) and valid (n,); got {tuple(signal.grad.shape)}, "
                f"{tuple(signal.valid.shape)}"
            )
        return signal

    def _pool_weights(self, valid: Tensor, active: Tensor, n_pool: int, generator: torch.Generator | None) -> Tensor:
        """The pool's (n_pool,) float64 CPU weights: Horvitz-Thompson with oversampling (`oversample_weights`,
        a batch of n_pool / oversample), else 1 / #valid on the valid rows and 0 elsewhere."""
        if self.config.oversample > 1:
            return oversample_weights(active, valid, n_pool // self.config.oversample, generator=generator)
        n_valid = max(int(valid.sum()), 1)
        return valid.to(torch.float64).cpu() / n_valid

    def _loss_weights(self, signal: PseudoReward, sub: Trajectory, keep: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        """The kept trajectories' loss weights, (n,): w itself, or with ``reweight`` w times the self-normalised
        path ratio dP*/dP_theta ∝ exp(g(X_K) / gamma) dq/dp_theta (`path_log_weights`), rescaled to w's sum.

        noise: the pool's increments (K, n_pool, d); keep (n,): the kept rows; sub: their trajectories.
        """
        if not self.config.reweight:
            return w
        device, dtype = w.device, w.dtype
        log_w = signal.value.to(device=device, dtype=torch.float64)[keep] / self.config.kl_weight + path_log_weights(
            self.base, sub, noise[:, keep])
        ratio = torch.exp(log_w - log_w.max())
        return (w * ratio.to(dtype)) * (w.sum() / (w * ratio.to(dtype)).sum())

    def _loss_terms(
        self, sub: Trajectory, indices: Tensor, v_base: Tensor, next_adjoint: Tensor, loss_w: Tensor, chunked: bool
    ) -> LossTerms:
        """The regression on the chosen steps (m,): v_base and a_{k+1} (m, n, d), weights loss_w (n,); chunked:
        backpropagated ``loss_chunk`` steps at a time (`chunked_matching_backward`), else one `matching_loss`."""
        cfg = self.config
        if chunked:
            no_sync = self.model.no_sync if isinstance(self.model, DistributedDataParallel) else None
            return chunked_matching_backward(
                lambda rows: model_at_steps(self.model, sub, indices[rows]), v_base, next_adjoint, indices, h=sub.h,
                offset=sub.offset, weights=loss_w, chunk=cfg.loss_chunk, conditioning=self.conditioning, no_sync=no_sync,
            )
        return matching_loss(
            model_at_steps(self.model, sub, indices), v_base, next_adjoint, indices, h=sub.h, offset=sub.offset,
            weights=loss_w, conditioning=self.conditioning,
        )

    def _empty_step(self, valid: Tensor, active: Tensor, like: Tensor) -> StepResult:
        """No valid trajectory: a zero loss attached to the parameters, and the fractions that say why."""
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        anchor = zero_loss(self.model, like)
        metrics = {name: zero for name in ("loss", "loss_at_base", "delta_v", "max_share", "loss_ess",
                                           "clipped_fraction", "mean_reward", "pseudo_reward", "kl", "objective",
                                           "batch", "path_ess")}
        metrics["loss"] = anchor.detach()
        metrics["valid_fraction"] = valid.to(like.dtype).mean()
        metrics["active_fraction"] = zero
        return StepResult(anchor, metrics)

    def state_dict(self) -> dict[str, Tensor]:
        """Running conditioning statistics (save them with the model's checkpoint)."""
        return self.conditioning.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`."""
        self.conditioning.load_state_dict(state)
