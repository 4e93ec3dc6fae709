"""The ``sweep:`` section itself (``parameters``, ``num_samples``, ``seed``, ``max_concurrent_trials``,
``scheduler``) as a :class:`SweepConfig`: merged over its schema (`pipelines.schema_sweep`, where its keys are
declared, defaulted and checked), with ``parameters`` turned into typed :class:`Domain` values
(`pipelines.sweep.spec` expands them into trials)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.config import ConfigError, explain
from pipelines.schema_sweep import SchedulerSection, SweepFile, SweepSection, check_sweep

__all__ = ["DOMAIN_KINDS", "Domain", "SchedulerSection", "SweepConfig", "parse_sweep"]

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform")
_NOT_SWEEPABLE = ("ray", "tracking")


@dataclass(frozen=True)
class Domain:
    """One swept key: ``grid``/``choice`` hold the values, ``uniform``/``loguniform`` hold (low, high)."""

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SweepConfig:
    """The ``sweep:`` section: domains, repeats of the grid, seed of the random draws, trials at once
    (0: derived from the cluster, :mod:`pipelines.sweep.resources`), optional early stopping."""

    parameters: tuple[Domain, ...]
    num_samples: int = 1
    seed: int = 0
    max_concurrent_trials: int = 0
    scheduler: SchedulerSection | None = None


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


def _section(raw: dict[str, Any]) -> SweepSection:
    """``raw`` merged over the section's schema; an unknown key or a badly typed value names ``sweep.<key>``."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepFile), {"sweep": raw})
        section = OmegaConf.to_object(merged).sweep  # type: ignore[union-attr]
    except OmegaConfBaseException as exc:
        raise ConfigError(explain(exc)) from None
    check_sweep(section)
    return section


def parse_sweep(raw: Any) -> SweepConfig:
    """The ``sweep:`` section as a plain dict -> :class:`SweepConfig`; problems raise ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'sweep' must be a mapping, got {raw!r}")
    section = _section(raw)
    flat: dict[str, Any] = {}
    _flatten("", section.parameters, flat)
    return SweepConfig(tuple(_domain(k, v) for k, v in flat.items()), section.num_samples, section.seed,
                       section.max_concurrent_trials, section.scheduler)
