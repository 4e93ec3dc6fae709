"""Typed configuration schema of every ``tfft`` command (OmegaConf structured configs).

Every key is documented here and in the README's configuration table; ``tune_configs/*.yaml`` files
override the defaults, and ``key=value`` arguments on the command line override the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipelines.schema_finetune import FinetuneConfig, LoraConfig
from pipelines.schema_reward import RewardConfig, ScreenConfig, ServeConfig
from rewards.robust import DEFAULT_BACKOFF_S, DEFAULT_MAX_IN_FLIGHT, DEFAULT_RETRIES

__all__ = [
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "ServeConfig",
    "ScreenConfig",
    "RewardConfig",
    "ObjectiveConfig",
    "check_objective",
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
    cached under ``cache_dir``, keyed by every setting that determines it (for a user model: ``model.target``, the
    content of the file that defines it, ``model.kwargs`` and ``model.sample_shape`` too). ``steps: 0``, or a ``model.checkpoint``: no pretraining,
    nothing cached; the model as built (and loaded) is the base model."""

    n_samples: int = 50_000
    steps: int = 3000
    batch_size: int = 512
    lr: float = 2e-3
    cache_dir: str = "~/.cache/tfft"


@dataclass
class ObjectiveConfig:
    """What to fine-tune for: ``kind`` mean | cvar; ``side`` right | left; tail mass ``alpha`` in (0, 1];
    ``kl_weight`` (gamma) > 0 weights KL(p || q); ``invalid_reward``: empty (null) excludes samples whose reward
    failed from the threshold, the tilt and every statistic, a number is the reward they take instead
    (`tfft.invalid`). ``per_condition`` (with ``data.conditions``): true (the default then) solves a threshold
    eta*_c on each condition's bank rows; false one eta* on the pooled bank; empty: true with conditions."""

    kind: Literal["cvar", "mean"] = "cvar"
    side: Literal["right", "left"] = "right"
    alpha: float = 0.1
    kl_weight: float = 10.0
    invalid_reward: Optional[float] = None
    per_condition: Optional[bool] = None


def check_objective(objective: ObjectiveConfig) -> None:
    """``objective.*`` checked where it is declared (``kind`` and ``side`` by their ``Literal`` types when merged,
    ``per_condition`` with the conditions, `pipelines.conditions`): ``side``, ``alpha`` and ``kl_weight`` by `tfft.objective.Tilt.check`, the rule the objective applies itself.
    Raises `pipelines.config.ConfigError` naming the key."""
    from pipelines.config import ConfigError, require  # that module imports this one
    from tfft.objective import Tilt

    try:
        Tilt.check(objective.side, objective.alpha, objective.kl_weight)
    except ValueError as exc:  # "alpha: expected ..."
        name, _, why = str(exc).partition(": ")
        raise ConfigError(f"'objective.{name}' {why}") from None
    invalid = objective.invalid_reward
    require(invalid is None or math.isfinite(invalid), "objective.invalid_reward",
            f"must be empty (exclude failed samples) or a finite number, got {invalid}")


@dataclass
class SamplerConfig:
    """How banks are sampled: ``kind`` sde (the law-preserving SDE of DESIGN §6, the default: the same sampler
    as fine-tuning, so the target statistics describe the tilt of the bank's own sampler) | ode (Euler on
    ``grid`` uniform | quadratic, finer near t = 0); ``steps`` time steps K, also the fine-tuning trajectories'
    K unless ``finetune.sde_steps`` says otherwise."""

    kind: Literal["sde", "ode"] = "sde"
    steps: int = 40
    grid: Literal["quadratic", "uniform"] = "quadratic"


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
