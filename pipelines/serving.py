"""A reward held once by a Ray Serve application, shared by every actor, worker and trial.

A reward model on a GPU is loaded once per reward actor, per training worker, per sweep trial. With
``reward.serve.enabled`` it is loaded once, by the replicas of a Ray Serve application::

    driver ──attach(cfg)──> Serve application `reward.serve.name`: RewardServer replicas, each holding the reward
                              ^            ^                 ^
    reward pool actors ───────┘   training workers ──┘   sweep trials (same application, by name)
    (ServedReward.evaluate)       (ServedReward.evaluate_with_grad)

:func:`attach` starts the application (or finds it running under that name: a team's shared reward server), asks
it what it serves (name, version, gradients, value kwargs) and returns the config with ``reward.target`` replaced
by :class:`ServedReward`, a thin picklable proxy that calls the application through its handle. Everything
downstream (banks, the reward cache, fine-tuning, statistics) is unchanged. :func:`detach` deletes an
application that :func:`attach` started, unless ``reward.serve.keep``.

Failures: a request past ``reward.serve.timeout_s`` is a 'timeout', a dead replica or a Serve error a 'crash';
the reward pool's retries and bisection apply as to any reward.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np
import torch

from pipelines.config import ConfigError
from pipelines.schema import Config, ServeConfig
from rewards.base import Reward, RewardBatch, import_object, load_reward
from rewards.robust import CallFailure

__all__ = ["RewardServer", "ServedReward", "attach", "detach", "served_differentiable", "PROXY"]

PROXY = "pipelines.serving:ServedReward"


class RewardServer:
    """The Serve deployment's class: one reward, built once per replica from ``target`` and ``kwargs``.

    Methods take and return numpy arrays (x: (n, d) float64) so that requests need no torch on the caller's
    side beyond the proxy.
    """

    def __init__(self, target: str, kwargs: dict[str, Any]):
        self.target, self.kwargs = target, dict(kwargs)
        self.reward = load_reward(target, kwargs)

    def describe_reward(self) -> dict[str, Any]:
        """What the application serves: target, kwargs, name, version, differentiable, value_kwargs."""
        value = self.reward.value_kwargs()
        return {"target": self.target, "kwargs": json.loads(json.dumps(self.kwargs, default=str)),
                "name": self.reward.name, "version": str(self.reward.version),
                "differentiable": bool(self.reward.differentiable),
                "value_kwargs": None if value is None else json.loads(json.dumps(value, default=str))}

    def evaluate(self, x: np.ndarray) -> dict[str, Any]:
        """Rewards of x (n, d): ``rewards`` (n,) float64, ``valid`` (n,) bool, ``errors`` (n reasons or None)."""
        with torch.no_grad():
            out = self.reward.evaluate(torch.from_numpy(np.asarray(x, dtype=np.float64)))
        return _batch_dict(out)

    def evaluate_with_grad(self, x: np.ndarray) -> dict[str, Any]:
        """As :meth:`evaluate`, plus ``grad`` (n, d) float64 = d r / d x (zero rows where invalid)."""
        out, grad = self.reward.evaluate_with_grad(torch.from_numpy(np.asarray(x, dtype=np.float64)))
        return {**_batch_dict(out), "grad": grad.detach().cpu().to(torch.float64).numpy()}

    def describe(self, x: np.ndarray, valid: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in self.reward.describe(x, valid).items()}


def _batch_dict(out: RewardBatch) -> dict[str, Any]:
    return {"rewards": out.rewards.detach().cpu().to(torch.float64).numpy(),
            "valid": out.valid.detach().cpu().numpy().astype(bool),
            "errors": None if out.errors is None else list(out.errors)}


class ServedReward(Reward):
    """A reward computed by the Serve application ``app`` (see the module doc); built by :func:`attach`.

    Args:
        app: the Serve application's name.
        target, kwargs: the reward the application holds (for the record; never built here).
        meta: what the application reported (:meth:`RewardServer.describe_reward`): name, version,
            differentiable, value_kwargs.
        timeout_s: seconds one request may take.
    """

    def __init__(self, app: str, target: str, kwargs: dict[str, Any], meta: dict[str, Any], timeout_s: float = 300.0):
        self.app, self.target, self.kwargs, self.meta = app, target, dict(kwargs), dict(meta)
        self.timeout_s = float(timeout_s)
        self.name = str(meta.get("name") or target)
        self.version = str(meta.get("version", "1"))
        self.differentiable = bool(meta.get("differentiable", False))
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None  # a handle is bound to its process: fetched again where the proxy lands
        return state

    def value_kwargs(self) -> dict[str, Any] | None:
        """The served reward's own cache identity (its value kwargs, else all its kwargs)."""
        value = self.meta.get("value_kwargs")
        return {"served": self.target, **(self.kwargs if value is None else value)}

    def _call(self, method: str, *args: Any) -> Any:
        from ray import serve

        try:
            if self._handle is None:
                self._handle = serve.get_app_handle(self.app)
            return getattr(self._handle, method).remote(*args).result(timeout_s=self.timeout_s)
        except TimeoutError:
            raise CallFailure("timeout", f"Serve application {self.app!r} gave no answer in {self.timeout_s} s") from None
        except Exception as exc:  # a dead replica, a deleted application, an error inside the reward
            self._handle = None
            raise CallFailure("crash", f"Serve application {self.app!r}: {type(exc).__name__}: {exc}"[:400]) from None

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        out = self._call("evaluate", x.detach().cpu().to(torch.float64).numpy())
        return _batch(out, x)

    def evaluate_with_grad(self, x: torch.Tensor) -> tuple[RewardBatch, torch.Tensor]:
        if not self.differentiable:
            raise TypeError(f"reward {self.name!r} has no gradients (differentiable = False)")
        out = self._call("evaluate_with_grad", x.detach().cpu().to(torch.float64).numpy())
        return _batch(out, x), torch.as_tensor(out["grad"], dtype=x.dtype, device=x.device)

    def describe(self, x: Any, valid: Any) -> dict[str, float]:
        return self._call("describe", np.asarray(x, dtype=np.float64), np.asarray(valid, dtype=bool))


def _batch(out: dict[str, Any], like: torch.Tensor) -> RewardBatch:
    rewards = torch.as_tensor(out["rewards"], dtype=torch.float64)
    if rewards.shape != (like.shape[0],):
        raise CallFailure("malformed", f"{tuple(rewards.shape)} rewards for {like.shape[0]} samples")
    return RewardBatch(rewards, torch.as_tensor(out["valid"], dtype=torch.bool), out["errors"])


def served_differentiable(cfg: Config) -> bool:
    """Whether the reward to serve has gradients, read from its class without building it (functions do)."""
    obj = import_object(cfg.reward.target)
    if isinstance(obj, Reward) or (isinstance(obj, type) and issubclass(obj, Reward)):
        return bool(obj.differentiable)  # declared on Reward
    return True  # a plain function (wrapped with autograd gradients) or a callable class not derived from Reward


def _deployment(sv: ServeConfig) -> Any:
    from ray import serve

    options: dict[str, Any] = {
        "name": "RewardServer",
        "ray_actor_options": {"num_cpus": sv.num_cpus, "num_gpus": sv.num_gpus},
        "max_ongoing_requests": sv.max_ongoing_requests,
    }
    if sv.max_replicas > 0:
        options["autoscaling_config"] = {"min_replicas": sv.min_replicas, "max_replicas": sv.max_replicas}
    else:
        options["num_replicas"] = sv.num_replicas
    return serve.deployment(RewardServer).options(**options)


def _running(name: str) -> bool:
    from ray import serve

    return name in serve.status().applications


def attach(cfg: Config, *, log: Callable[[str], None] = print) -> tuple[Config, bool]:
    """Serve ``cfg``'s reward (start the application, or join it by name) and point the config at it.

    Ray must be connected. Returns (the config with ``reward.target`` = :data:`PROXY`, whether this call started
    the application). Unchanged config and False when ``reward.serve.enabled`` is off. Raises ConfigError when an
    application of that name serves another reward.
    """
    sv = cfg.reward.serve
    if not sv.enabled or cfg.reward.target == PROXY:
        return cfg, False
    from ray import serve

    started = False
    if _running(sv.name):
        log(f"[serve] using the running application {sv.name!r}")
    else:
        log(f"[serve] starting application {sv.name!r}: {cfg.reward.target} on "
            f"{'autoscaling %d-%d' % (sv.min_replicas, sv.max_replicas) if sv.max_replicas else sv.num_replicas} "
            f"replica(s), {sv.num_cpus:g} CPU / {sv.num_gpus:g} GPU each")
        app = _deployment(sv).bind(cfg.reward.target, dict(cfg.reward.kwargs))
        serve.run(app, name=sv.name, route_prefix=None)
        started = True
    meta = serve.get_app_handle(sv.name).describe_reward.remote().result(timeout_s=sv.timeout_s)
    kwargs = json.loads(json.dumps(dict(cfg.reward.kwargs), default=str))
    if meta["target"] != cfg.reward.target or meta["kwargs"] != kwargs:
        raise ConfigError(
            f"'reward.serve.name': the running application {sv.name!r} serves {meta['target']} with {meta['kwargs']}, "
            f"not {cfg.reward.target} with {kwargs}; choose another name or stop it"
        )
    proxy_kwargs = {"app": sv.name, "target": cfg.reward.target, "kwargs": kwargs, "meta": meta,
                    "timeout_s": sv.timeout_s}
    reward = dataclasses.replace(cfg.reward, target=PROXY, kwargs=proxy_kwargs)
    return dataclasses.replace(cfg, reward=reward), started


def detach(cfg: Config, started: bool, *, log: Callable[[str], None] = print) -> None:
    """Delete the application if :func:`attach` started it and ``reward.serve.keep`` is off."""
    sv = cfg.reward.serve
    if not started or sv.keep:
        return
    from ray import serve

    try:
        serve.delete(sv.name)
        log(f"[serve] deleted application {sv.name!r}")
    except Exception as exc:  # the run's results are written; a failed clean-up is only reported
        log(f"[serve] WARNING: could not delete application {sv.name!r}: {exc}")
