"""Typed configuration schema, the ``reward`` (with ``reward.serve`` and ``reward.screen``) sections (re-exported by `pipelines.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


__all__ = ["ServeConfig", "ScreenConfig", "RewardConfig"]


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
