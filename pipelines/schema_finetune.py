"""Typed configuration schema, the ``finetune`` (with ``finetune.lora``) sections (re-exported by `pipelines.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["LoraConfig", "FinetuneConfig", "SOLVERS"]

SOLVERS = ("adjoint", "weighted")  # what finetune.solver names, or resolves "auto" to (pipelines.stages.preflight)


@dataclass
class LoraConfig:
    """LoRA adapters through peft (README "LoRA"; `pipelines.lora`): with ``enabled`` only the adapters train
    (the optimiser and DDP see nothing else) and the base velocity is the same network with them switched off.
    ``rank`` r >= 1; ``alpha`` (empty: = rank) sets the adapter's scale alpha / r; ``dropout`` on the adapter's
    input; ``target_modules``: module-name patterns as peft takes a list (a module matches a pattern equal to its
    full name or ending in ``.pattern``), each must match a module; empty (default): every ``nn.Linear`` of the
    network, found by name, none excluded. ``merge``: also write ``checkpoint/merged.safetensors``, the user
    network's state dict with the adapters merged (loadable without peft)."""

    enabled: bool = False
    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    merge: bool = False


@dataclass
class FinetuneConfig:
    """Fine-tuning in a Ray Train worker group.

    ``solver``: adjoint (adjoint matching, needs reward gradients) | weighted (weighted flow matching on
    the bank, DESIGN §7) | auto (adjoint when the reward is differentiable). ``batch_size`` is global
    (split over workers); the learning rate ``lr`` is reached by a linear warm-up over ``warmup_steps``, then ``lr_schedule``: constant
    (default) | cosine (decays to zero over ``steps``, so the final state carries little optimiser noise: the
    molecule configs use it; on the 2-D task it left the right tail further from its target);
    ``grad_clip`` caps the gradient norm (set so that it is rarely hit: the fraction of
    clipped steps is logged as ``grad_clipped``); ``reward_grad_clip`` (0: off) caps the norm of each sample's
    reward gradient before it enters the adjoint (rewards with steep walls, e.g. atom clashes in an energy).
    ``anchor`` (weighted only, default on): the anchored weighted flow-matching loss (``tfft.weighted``): a
    control variate on the base velocity, so that rows outside the tail leave the model where it is; off: the
    plain loss, which refits the model to the bank's points everywhere. ``time_power`` (weighted only): draw
    the flow-matching times as t = u^(1/time_power) (1: uniform; > 1 favours late times, where a tilt on fine
    detail of the samples shows; the minimiser is unchanged, ``tfft.weighted.draw_times``).
    ``holdout_fraction`` (anchored weighted only; 0, the default: off): hold this fraction of the bank's rows out;
    at every logged window the guard follows the held-out gain L(base) - L(model) of the anchored loss on them
    (``tfft.holdout``: positive when the model is closer to the tilted target than the base is).
    ``sde_steps``: K of the training trajectories (0: ``sampler.steps``, one sampler for bank, training and
    evaluation). ``late_fraction``, ``n_early``: the loss's time steps. The regression's conditioning (DESIGN
    §6): ``clip_quantile`` (0: off) and ``clip_factor`` clip ||sigma a|| per sample at
    ``clip_factor`` times that running quantile of the non-zero targets (only outliers); ``normalize`` (off by default) divides each step's residual by a running scale of ||sigma a||^2 / d:
    it evens out the loss over steps but shifts the gradient's weight to the last steps, and on the 2-D task it
    reached a right-CVaR of 5.18 where the unnormalised loss reached 6.30 (target 6.48) in the same budget
    (``benchmarks/results/solver_ablation.md``). ``oversample``: draw this many times the
    batch in trajectories and keep every active one (up to half the batch) plus a weighted random subset of the
    rest (more tail signal per update for the cost of sampling and rewards, not of the loss).
    ``fast_path`` (default on): the solver's fast path, same loss and gradients as the reference (adjoint only
    for trajectories in the tail, the sampler's evaluations reused by the loss, CUDA graphs on GPUs;
    ``benchmarks/results/step_speed_*.md``); off: the reference path. ``matmul_precision``: highest (exact
    float32) | high (TF32 matmuls on GPUs that have them; ``benchmarks/results/step_speed_cuda_tf32.md``).
    Memory of large models (adjoint solver): ``loss_chunk`` evaluates and backpropagates the loss this many
    chosen time steps at a time (same gradient; 0: all at once); ``gradient_checkpointing`` recomputes the
    network's activations in the backward pass (modules that support it: diffusers models); with LoRA,
    ``checkpoint_adjoint`` says whether the base's calls (the lean adjoint's vector-Jacobian products, adapters
    off: ``pipelines.lora.AdapterOffVelocity``) are checkpointed too (least memory) or keep their activations (one
    forward pass less per adjoint step); ``adjoint_chunk`` runs those products this many trajectories at a time
    (same numbers, the activations of fewer rows alive; 0: all at once).
    ``reweight`` (adjoint solver): weight each path's regression by exp(g / gamma) times the path likelihood ratio
    of base to model (self-normalised per batch), so that the target is the optimal control from the first step;
    on a right tail the plain on-policy regression overshoots and oscillates (``benchmarks/results/
    right_tail_ablation.md``). Needs large batches under strong tilts (the weights' ESS is logged as path_ess).
    ``autocast``: none | bfloat16: the adjoint solver's network calls under ``torch.autocast`` (the SDE state, the
    adjoint and the regression stay float32; the closed-form test holds at the same accuracy).
    The guard (``guard``): keep the best state by ``guard_metric`` (objective: the running E[g] - gamma KL;
    pseudo_reward: E[g] alone) when the last is worse by more than two standard errors, and the starting state
    when no window beat the base model's value; stop early when the training samples' validity falls more than
    ``guard_validity_drop`` below the base bank's, or when the metric stays below its start for
    ``guard_patience`` logged windows. After the evaluation the base model is kept when the fine-tuned samples'
    own statistic is below the base bank's by more than ``guard_eval_margin`` standard errors of the difference
    (0: at all; ``pipelines.eval_guard``); with ``guard_paired_size`` N > 0 that check instead draws N samples
    (per condition) of the base and of the fine-tuned model with common noise and compares them pairwise (a far
    smaller standard error; N more reward calls for each model). The objective's KL is the path KL along the SDE, an upper bound of
    KL(p || q) that counts late-time velocity changes the samples barely feel; where that bound dominates
    (molecules), guard on pseudo_reward. Metrics every ``log_every`` steps; checkpoint every ``checkpoint_every``
    steps. Workers: ``num_workers`` (DDP), ``cpus_per_worker``, one GPU each when ``use_gpu``, plus custom
    ``resources_per_worker`` (e.g. ``{train_node: 1}``); a failed worker group restarts from the latest
    checkpoint up to ``max_failures`` times; Ray Train's controller polls the workers every ``poll_interval_s``
    seconds, which is also how late it notices that training ended or a worker died. ``backend``: ray (default: the Ray Train worker group above) |
    local (the same loop in the driver process, one worker, ``num_workers`` must be 1, cuda:0 when ``use_gpu``;
    no worker group start-up, for short runs, laptops and tests; checkpoints and resume as with ray, no
    ``max_failures`` restarts; sweeps need ray).
    """

    solver: Literal["auto", "adjoint", "weighted"] = "auto"
    steps: int = 600
    batch_size: int = 512
    lr: float = 3e-3
    warmup_steps: int = 20
    lr_schedule: Literal["constant", "cosine"] = "constant"
    anchor: bool = True
    time_power: float = 1.0
    holdout_fraction: float = 0.0
    grad_clip: float = 100.0
    reward_grad_clip: float = 0.0
    sde_steps: int = 0
    late_fraction: float = 0.25
    n_early: int = 10
    normalize: bool = False
    clip_quantile: float = 0.9
    clip_factor: float = 2.0
    oversample: int = 1
    fast_path: bool = True
    loss_chunk: int = 0
    adjoint_chunk: int = 0
    gradient_checkpointing: bool = False
    checkpoint_adjoint: bool = True
    autocast: Literal["none", "bfloat16"] = "none"
    reweight: bool = False
    matmul_precision: Literal["highest", "high"] = "highest"
    guard: bool = True
    guard_validity_drop: float = 0.05
    guard_eval_margin: float = 0.0
    guard_paired_size: int = 0
    guard_patience: int = 5
    guard_metric: Literal["objective", "pseudo_reward"] = "objective"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    log_every: int = 25
    checkpoint_every: int = 100
    max_failures: int = 2
    poll_interval_s: float = 0.25
    backend: Literal["ray", "local"] = "ray"
    lora: LoraConfig = field(default_factory=LoraConfig)

