"""Typed configuration schema of every ``tfft`` command (OmegaConf structured configs).

Every key is documented here and in the README's configuration table; ``tune_configs/*.yaml`` files
override the defaults, and ``key=value`` arguments on the command line override the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rewards.robust import DEFAULT_BACKOFF_S, DEFAULT_MAX_IN_FLIGHT, DEFAULT_RETRIES

__all__ = [
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "ServeConfig",
    "ScreenConfig",
    "RewardConfig",
    "ObjectiveConfig",
    "SamplerConfig",
    "PoolConfig",
    "RewardPoolConfig",
    "BankConfig",
    "EvalConfig",
    "LoraConfig",
    "FinetuneConfig",
    "ThresholdConfig",
    "TrackingConfig",
    "RayConfig",
    "Config",
]


@dataclass
class DataConfig:
    """Pretraining data: ``source`` is ``module:callable`` with ``f(n: int, seed: int, **kwargs) -> array
    (n, d)``; ``kwargs`` go to it (e.g. ``smiles: ${task.smiles}``). ``conditions``: empty (unconditional), a
    list of condition values (ints, floats or strings: class labels, prompts), or ``module:callable`` returning
    such a list (called once, without arguments, when the config is resolved; the list then replaces it). With
    conditions the source is called once per condition with the keyword ``cond=value`` (``pretrain.n_samples``
    each), the model is conditional, and ``bank.size``/``eval.size`` count samples per condition."""

    source: str = "rewards.toy2d:sample_base"
    kwargs: dict[str, Any] = field(default_factory=dict)
    conditions: Any = None


@dataclass
class ModelConfig:
    """The base flow model: the built-in velocity MLP, or the user's own module (README: "Bring your own model").

    ``target``: empty (default) builds the built-in ``tfft.model.VelocityMLP`` from ``hidden`` (width),
    ``depth`` (hidden layers) and ``time_features`` (Fourier time features), on flat samples of the data's
    dimension d. Otherwise ``module:factory``, called as ``factory(**kwargs)``; it returns a ``torch.nn.Module``
    whose ``forward(x, t, cond)`` takes x (n, *sample_shape), t (n,) and ``cond`` (None: conditions are not
    passed yet) and returns the velocity of the linear interpolant x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1
    data), shaped like x (``hidden``, ``depth`` and ``time_features`` are then unused). ``kwargs``: keyword
    arguments of the factory. ``sample_shape``: the shape of one sample, a list of positive ints whose
    product is the data's dimension d (empty: ``[d]``); banks store samples flattened in row-major order and
    ``summary.json["model"]["sample_shape"]`` records it. ``checkpoint``: empty, or a state dict to load
    strictly into the model (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, also a tfft
    ``checkpoint/model.pt``; or ``.safetensors``). With a checkpoint nothing is pretrained, whatever
    ``pretrain.steps`` says; without one, ``pretrain.steps: 0`` takes the model as built (seeded by ``seed``)."""

    target: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    sample_shape: list[int] = field(default_factory=list)
    checkpoint: str = ""
    hidden: int = 128
    depth: int = 3
    time_features: int = 16


@dataclass
class PretrainConfig:
    """Flow-matching pretraining of the base model on ``n_samples`` draws of ``data.source``; the result is
    cached under ``cache_dir``, keyed by every setting that determines it (for a user model: ``model.target``,
    ``model.kwargs`` and ``model.sample_shape`` too). ``steps: 0``, or a ``model.checkpoint``: no pretraining,
    nothing cached; the model as built (and loaded) is the base model."""

    n_samples: int = 50_000
    steps: int = 3000
    batch_size: int = 512
    lr: float = 2e-3
    cache_dir: str = "~/.cache/tfft"


@dataclass
class ServeConfig:
    """The reward held once by a Ray Serve application (`pipelines.serving`), shared by every reward actor,
    training worker and sweep trial. ``enabled``: serve it; ``name``: the application (reached by name when it
    is already running, else started by tfft); ``num_replicas`` fixed, or autoscaling between ``min_replicas``
    and ``max_replicas`` when ``max_replicas`` > 0; ``num_cpus``/``num_gpus`` per replica;
    ``max_ongoing_requests`` per replica; ``timeout_s`` per request; ``keep``: leave an application tfft
    started running when the run ends."""

    enabled: bool = False
    name: str = "tfft-reward"
    num_replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 8
    timeout_s: float = 300.0
    keep: bool = False


@dataclass
class ScreenConfig:
    """Screened evaluation of the banks (`pipelines.screening`, `tfft.screen`): a cheap reward ranks the samples
    and the expensive one is paid only where the tail can be. ``target``: ``module:Name`` of the cheap reward (a
    Reward class or a function, as ``reward.target``; empty: no screening, every sample is evaluated); ``kwargs``
    go to it. ``audit``: fraction of each bank evaluated in full at random (at least ``min_audit`` samples);
    ``tolerance``: the largest fraction of the tail that may be left unevaluated, certified at ``confidence``
    (one-sided Wilson bound from the audit), else the bank is evaluated in full; ``batch_size``: samples per
    screened batch of expensive calls (0: alpha * bank size / 4). Needs ``objective.kind=cvar`` with alpha < 1."""

    target: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    audit: float = 0.1
    min_audit: int = 100
    tolerance: float = 0.05
    confidence: float = 0.95
    batch_size: int = 0


@dataclass
class RewardConfig:
    """The reward: ``target`` is ``module:Name`` of a Reward class or a function; ``kwargs`` go to it;
    ``serve``: hold it once in a Ray Serve application (:class:`ServeConfig`); ``screen``: a cheap reward that
    decides which samples need the expensive one (:class:`ScreenConfig`)."""

    target: str = "rewards.toy2d:TailReward2D"
    kwargs: dict[str, Any] = field(default_factory=dict)
    serve: ServeConfig = field(default_factory=ServeConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)


@dataclass
class ObjectiveConfig:
    """What to fine-tune for: ``kind`` mean | cvar; ``side`` right | left; tail mass ``alpha`` in (0, 1];
    ``kl_weight`` (gamma) > 0 weights KL(p || q); ``invalid_reward``: empty (null) excludes samples whose reward
    failed from the threshold, the tilt and every statistic, a number is the reward they take instead
    (`tfft.invalid`). ``per_condition`` (with ``data.conditions``): true (the default then) solves a threshold
    eta*_c on each condition's bank rows; false one eta* on the pooled bank; empty: true with conditions."""

    kind: str = "cvar"
    side: str = "right"
    alpha: float = 0.1
    kl_weight: float = 10.0
    invalid_reward: Optional[float] = None
    per_condition: Optional[bool] = None


@dataclass
class SamplerConfig:
    """How banks are sampled: ``kind`` sde (the law-preserving SDE of DESIGN §6, the default: the same sampler
    as fine-tuning, so the target statistics describe the tilt of the bank's own sampler) | ode (Euler on
    ``grid`` uniform | quadratic, finer near t = 0); ``steps`` time steps K, also the fine-tuning trajectories'
    K unless ``finetune.sde_steps`` says otherwise."""

    kind: str = "sde"
    steps: int = 40
    grid: str = "quadratic"


@dataclass
class PoolConfig:
    """A Ray Data actor pool: fixed ``size``, or autoscaling between ``min_size`` and ``max_size`` when
    both are set; resources per actor (``num_cpus``, ``num_gpus``, and custom ``resources`` such as
    ``{reward_node: 1}`` that pin the pool to the nodes offering them); rows per call (``batch_size``).
    Actors on a ``num_gpus > 0`` pool use CUDA."""

    size: int = 1
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 1024
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardPoolConfig(PoolConfig):
    """The reward pool, plus how each actor calls the reward: ``call_size`` samples per reward call
    (0: the whole batch), up to ``max_in_flight`` calls at once per actor (threads: for latency-bound
    simulators), failed calls retried ``retries`` times with back-off from ``backoff_s`` seconds, a batch
    that keeps failing bisected to isolate the samples that cause it."""

    call_size: int = 0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S


@dataclass
class BankConfig:
    """A bank of samples with rewards: ``size`` samples, written in shards of ``shard_size`` rows.
    ``cache``: reuse rewards from the persistent cache at ``cache_dir`` (keyed by sample content and
    reward identity; share it on a cluster). ``start_timeout_s``: 0 lets samples flow as soon as a
    pool's first actor is up; > 0 waits until every pool has all its actors (its ``min_size``), so work
    spreads over the pool's nodes from the start, and fails with Ray's "Timed out while starting actors"
    after this many seconds when the cluster has no room for them."""

    size: int = 20_000
    shard_size: int = 5000
    cache: bool = True
    cache_dir: str = "~/.cache/tfft/rewards"
    start_timeout_s: float = 0.0
    sampler: PoolConfig = field(default_factory=PoolConfig)
    reward: RewardPoolConfig = field(default_factory=RewardPoolConfig)


@dataclass
class EvalConfig:
    """Evaluation bank drawn from the fine-tuned model through the same pools as the base bank."""

    size: int = 20_000


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
    network's activations in the backward pass (modules that support it: diffusers and transformers models; the
    base velocity with LoRA adapters off is never checkpointed, ``pipelines.lora.AdapterOffVelocity``).
    ``autocast``: none | bfloat16: the adjoint solver's network calls under ``torch.autocast`` (the SDE state, the
    adjoint and the regression stay float32; the closed-form test holds at the same accuracy).
    The guard (``guard``): keep the best state by ``guard_metric`` (objective: the running E[g] - gamma KL;
    pseudo_reward: E[g] alone) when the last is worse by more than two standard errors, and the starting state
    when no window beat the base model's value; stop early when the training samples' validity falls more than
    ``guard_validity_drop`` below the base bank's, or when the metric stays below its start for
    ``guard_patience`` logged windows. The objective's KL is the path KL along the SDE, an upper bound of
    KL(p || q) that counts late-time velocity changes the samples barely feel; where that bound dominates
    (molecules), guard on pseudo_reward. Metrics every ``log_every`` steps; checkpoint every ``checkpoint_every``
    steps. Workers: ``num_workers`` (DDP), ``cpus_per_worker``, one GPU each when ``use_gpu``, plus custom
    ``resources_per_worker`` (e.g. ``{train_node: 1}``); a failed worker group restarts from the latest
    checkpoint up to ``max_failures`` times. ``backend``: ray (default: the Ray Train worker group above) |
    local (the same loop in the driver process, one worker, ``num_workers`` must be 1, cuda:0 when ``use_gpu``;
    no worker group start-up, for short runs, laptops and tests; checkpoints and resume as with ray, no
    ``max_failures`` restarts; sweeps need ray).
    """

    solver: str = "auto"
    steps: int = 600
    batch_size: int = 512
    lr: float = 3e-3
    warmup_steps: int = 20
    lr_schedule: str = "constant"
    anchor: bool = True
    time_power: float = 1.0
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
    gradient_checkpointing: bool = False
    autocast: str = "none"
    matmul_precision: str = "highest"
    guard: bool = True
    guard_validity_drop: float = 0.05
    guard_patience: int = 5
    guard_metric: str = "objective"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    log_every: int = 25
    checkpoint_every: int = 100
    max_failures: int = 2
    backend: str = "ray"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ThresholdConfig:
    """``ess_warning``: warn when the ESS of the bank's tilt weights is below this. ``refine_rounds``:
    rounds of threshold refinement from the fine-tuned model's own tail mass (DESIGN §5), each a bank of
    ``refine_size`` samples and ``refine_steps`` warm-started fine-tuning steps (0: finetune.steps)."""

    refine_rounds: int = 0
    refine_size: int = 5000
    refine_steps: int = 0
    ess_warning: float = 1000.0


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` (empty: ``sqlite:///<cwd>/mlflow.db``, made absolute); ``experiment`` name."""

    uri: str = ""
    experiment: str = "tfft"
    enabled: bool = True


@dataclass
class RayConfig:
    """Ray: ``address`` of an existing cluster (empty: RAY_ADDRESS or a local Ray); ``num_cpus`` of a
    local Ray (0: all cores)."""

    address: str = ""
    num_cpus: int = 0


@dataclass
class Config:
    """The whole configuration of ``tfft run`` / ``tfft pretrain``.

    ``task`` is free-form: values shared by the data source and the reward through interpolation, e.g.
    ``task: {smiles: CCO}`` with ``data.kwargs.smiles: ${task.smiles}`` (override ``task.smiles=...``)."""

    seed: int = 0
    task: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
