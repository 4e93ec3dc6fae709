"""The ``sweep:`` section itself (``parameters``, ``num_samples``, ``seed``, ``max_concurrent_trials``,
``scheduler``): parsed and checked into a :class:`SweepConfig` (`pipelines.sweep.spec` expands it into trials)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from pipelines.config import ConfigError

__all__ = ["DOMAIN_KINDS", "Domain", "SchedulerConfig", "SweepConfig", "parse_sweep"]

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform")
_NOT_SWEEPABLE = ("ray", "tracking")


@dataclass(frozen=True)
class Domain:
    """One swept key: ``grid``/``choice`` hold the values, ``uniform``/``loguniform`` hold (low, high)."""

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SchedulerConfig:
    """ASHA early stopping on an intermediate training metric reported every ``finetune.log_every`` steps."""

    metric: str = "active_fraction"
    mode: str = "max"
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass(frozen=True)
class SweepConfig:
    """The ``sweep:`` section: domains, repeats of the grid, seed of the random draws, trials at once
    (0: derived from the cluster, :mod:`pipelines.sweep.resources`), optional early stopping."""

    parameters: tuple[Domain, ...]
    num_samples: int = 1
    seed: int = 0
    max_concurrent_trials: int = 0
    scheduler: SchedulerConfig | None = None


def _flatten(prefix: str, node: Any, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and not (set(node) & set(DOMAIN_KINDS)):
        if not node:
            raise ConfigError(f"'sweep.parameters{'.' + prefix if prefix else ''}' is empty")
        for k, v in node.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = node


def _domain(key: str, spec: Any) -> Domain:
    where = f"'sweep.parameters.{key}'"
    if key.split(".")[0] in _NOT_SWEEPABLE or key.split(".")[0] == "sweep":
        raise ConfigError(f"{where} cannot be swept (one value for the whole sweep)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAIN_KINDS:
        raise ConfigError(f"{where} must be one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                          f"{{loguniform: [low, high]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
        raise ConfigError(f"{where}: '{kind}' needs a non-empty list of plain values, got {values!r}")
    if kind in ("uniform", "loguniform"):
        ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ok = ok and values[0] < values[1] and (kind == "uniform" or values[0] > 0)
        if not ok:
            raise ConfigError(f"{where}: '{kind}' needs [low, high] with low < high" + (" and low > 0" if kind == "loguniform" else ""))
    return Domain(key, kind, tuple(values))


def _int(raw: dict[str, Any], key: str, default: int, minimum: int, section: str = "sweep") -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"'{section}.{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _check_keys(section: dict[str, Any], known: set[str], prefix: str) -> None:
    """ConfigError naming the first key of ``section`` that is not ``known`` (as ``prefix.key``)."""
    for key in section:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}.{key}'")


def parse_sweep(raw: Any) -> SweepConfig:
    """The ``sweep:`` section as a plain dict -> :class:`SweepConfig`; problems raise ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'sweep' must be a mapping, got {raw!r}")
    _check_keys(raw, {"parameters", "num_samples", "seed", "max_concurrent_trials", "scheduler"}, "sweep")
    flat: dict[str, Any] = {}
    _flatten("", raw.get("parameters") or {}, flat)
    scheduler = None
    sched = raw.get("scheduler")
    if sched is not None:
        if not isinstance(sched, dict):
            raise ConfigError(f"'sweep.scheduler' must be a mapping or null, got {sched!r}")
        _check_keys(sched, {"kind", "metric", "mode", "grace_period", "reduction_factor"}, "sweep.scheduler")
        if sched.get("kind", "asha") != "asha":
            raise ConfigError(f"'sweep.scheduler.kind' must be 'asha', got {sched['kind']!r}")
        if sched.get("mode", "max") not in ("max", "min"):
            raise ConfigError(f"'sweep.scheduler.mode' must be 'max' or 'min', got {sched['mode']!r}")
        defaults = SchedulerConfig()
        scheduler = SchedulerConfig(
            metric=str(sched.get("metric", defaults.metric)),
            mode=sched.get("mode", defaults.mode),
            grace_period=_int(sched, "grace_period", defaults.grace_period, 1, "sweep.scheduler"),
            reduction_factor=_int(sched, "reduction_factor", defaults.reduction_factor, 2, "sweep.scheduler"),
        )
    return SweepConfig(
        parameters=tuple(_domain(k, v) for k, v in flat.items()),
        num_samples=_int(raw, "num_samples", 1, 1),
        seed=_int(raw, "seed", 0, 0),
        max_concurrent_trials=_int(raw, "max_concurrent_trials", 0, 0),
        scheduler=scheduler,
    )
