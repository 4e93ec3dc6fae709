"""The condition axis in the pipeline: ``data.conditions`` resolved and checked, and how a value is named.

``data.conditions`` is a list of condition values (ints, floats or strings) or ``module:callable`` returning one;
:func:`resolve_conditions` turns it into the checked list once, when the config is resolved, so every later stage
(Ray actors, training workers, the summary) reads a plain list from the config. A condition is referred to by its
index into that list wherever tensors or bank columns hold it (`tfft.conditions`), and by ``str(value)`` in
``summary.json["per_condition"]``. Features that do not support conditions yet are refused here, before any work.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pipelines.config import ConfigError
from pipelines.schema import Config

__all__ = ["resolve_conditions", "check_conditions", "conditions_of", "condition_count", "per_condition", "metric_prefix"]

_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def conditions_of(cfg: Config) -> list[Any]:
    """The resolved list of condition values; [] for an unconditional run."""
    values = cfg.data.conditions
    return list(values) if isinstance(values, (list, tuple)) else []


def condition_count(cfg: Config) -> int:
    """How many conditions a bank's ``size`` per condition is multiplied by: C, or 1 for an unconditional run."""
    return max(len(conditions_of(cfg)), 1)


def per_condition(cfg: Config) -> bool:
    """True when thresholds are solved per condition (``objective.per_condition``, default true with conditions)."""
    return bool(conditions_of(cfg)) and cfg.objective.per_condition is not False


def metric_prefix(value: Any) -> str:
    """``cond/<value>`` with characters MLflow does not allow in metric names replaced by '_'."""
    return "cond/" + _MLFLOW_UNSAFE.sub("_", str(value))


def _check_values(values: Any, origin: str) -> list[Any]:
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"'data.conditions' {origin} must be a list of values, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ConfigError(f"'data.conditions' {origin} is an empty list; leave it unset for an unconditional model")
    for v in values:
        ok = isinstance(v, (int, float, str)) and not isinstance(v, bool)
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"'data.conditions' {origin} must hold ints, finite floats or strings (JSON scalars), "
                              f"got {v!r} of type {type(v).__name__}")
    names = [str(v) for v in values]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"'data.conditions' {origin} must be unique (also as text); repeated: {repeated}")
    json.dumps(values)
    return values


def resolve_conditions(cfg: Config) -> None:
    """Replace a ``module:callable`` in ``data.conditions`` by the list it returns, and check the list (in place)."""
    raw = cfg.data.conditions
    if raw is None or raw == "" or (isinstance(raw, (list, tuple)) and not raw):  # unconditional
        cfg.data.conditions = []
        return
    if isinstance(raw, str):
        from rewards.base import import_object

        try:
            fn = import_object(raw)
        except ValueError as exc:
            raise ConfigError(f"'data.conditions': {exc}") from None
        if not callable(fn):
            raise ConfigError(f"'data.conditions' {raw!r} is not callable")
        try:
            values = fn()
        except Exception as exc:
            raise ConfigError(f"'data.conditions' {raw!r} failed when called: {type(exc).__name__}: {exc}") from exc
        cfg.data.conditions = _check_values(values, f"(returned by {raw!r})")
        return
    if isinstance(raw, dict):
        raise ConfigError(f"'data.conditions' must be a list of values or 'module:callable', got a mapping {raw!r}")
    cfg.data.conditions = _check_values(raw, "")


def check_conditions(cfg: Config, check_imports: bool) -> None:
    """Resolve ``data.conditions``; with conditions refuse what does not support them yet (naming the keys)."""
    if cfg.objective.per_condition is not None and not cfg.data.conditions:
        raise ConfigError("'objective.per_condition' is set but 'data.conditions' is empty; it applies only to "
                          "conditional runs")
    if check_imports or not isinstance(cfg.data.conditions, str):
        resolve_conditions(cfg)
    if not conditions_of(cfg):
        return
    refused = {
        "reward.screen.target": bool(cfg.reward.screen.target),
        "threshold.refine_rounds": cfg.threshold.refine_rounds > 0,
        "reward.serve.enabled": cfg.reward.serve.enabled,
        "reward.target": cfg.reward.target.startswith("rewards.http:"),
    }
    for key, on in refused.items():
        if on:
            raise ConfigError(f"'{key}' is not supported with 'data.conditions' yet (screening, threshold refinement, "
                              "served and HTTP rewards run unconditionally); unset one of them")
    if check_imports:
        from rewards.base import load_reward, reward_takes_cond

        try:
            reward = load_reward(cfg.reward.target, cfg.reward.kwargs)
        except ValueError:  # validate() reports it
            return
        if not reward_takes_cond(reward):
            raise ConfigError(f"'reward.target' {cfg.reward.target!r} cannot take conditions: with 'data.conditions' "
                              "a reward's evaluate(x, cond=None) (or a function f(x, cond)) gets each sample's condition")
