"""The ``sweep:`` section of a sweep config: parameter domains, their expansion into named trials.

A sweep config is a run config plus a ``sweep:`` section::

    sweep:
      parameters:                        # any config key, dotted or nested
        objective.alpha: {grid: [0.05, 0.1, 0.2]}
        objective.kl_weight: {grid: [5, 10]}
        seed: {choice: [0, 1, 2]}        # also {uniform: [lo, hi]}, {loguniform: [lo, hi]}
      num_samples: 1                     # repeats of the grid (random domains redrawn each time)
      seed: 0                            # seeds the random draws
      max_concurrent_trials: 0           # 0: derived from the cluster's resources
      scheduler: {kind: asha, metric: active_fraction, mode: max}   # optional early stopping

Expansion follows Ray Tune's semantics (every grid point, ``num_samples`` times), but happens here,
before Ray starts: every trial's config is validated up front, and trial names are derived from the
parameter values (``alpha=0.05_kl_weight=5``), so a restarted sweep finds the trials it finished.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.config import ConfigError, from_dict
from pipelines.schema import Config
from pipelines.sweep.section import Domain, SchedulerSection, SweepConfig, parse_sweep

__all__ = ["Domain", "SchedulerSection", "SweepConfig", "TrialSpec", "Sweep", "load_sweep", "parse_sweep", "expand"]

# Sections whose values fix the base model and its bank (pipelines.stages.base.prepare_base): trials that agree
# on them share one base bank.
BANK_SECTIONS = ("seed", "data", "model", "pretrain", "reward", "sampler", "bank")


@dataclass(frozen=True)
class TrialSpec:
    """A trial: its name, the swept values (dotted keys) and its validated config."""

    name: str
    params: dict[str, Any]
    config: Config

    @property
    def bank_group(self) -> str:
        """Name of the base bank this trial shares ("" when every trial shares one)."""
        return _name({k: v for k, v in self.params.items() if k.split(".")[0] in BANK_SECTIONS}, None)


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: the base run config (the file without ``sweep:``), the section, and the trials."""

    base: Config
    sweep: SweepConfig
    trials: list[TrialSpec]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def _name(params: dict[str, Any], sample: int | None) -> str:
    """``alpha=0.05_kl_weight=5``: last key component unless two swept keys share it."""
    lasts = [k.split(".")[-1] for k in params]
    parts = [f"{k.split('.')[-1] if lasts.count(k.split('.')[-1]) == 1 else k}={_format(v)}" for k, v in params.items()]
    if sample is not None:
        parts.append(f"sample={sample}")
    return "_".join(parts)


def expand(sweep: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, params)`` of every trial: each grid point ``num_samples`` times, random domains drawn from
    ``sweep.seed`` in a fixed order (raising ``num_samples`` later keeps the earlier trials)."""
    grid = [d for d in sweep.parameters if d.kind == "grid"]
    rng = np.random.default_rng(sweep.seed)
    trials = []
    for sample in range(sweep.num_samples):
        for point in itertools.product(*(d.values for d in grid)):
            chosen = dict(zip((d.key for d in grid), point))
            params = {}
            for d in sweep.parameters:
                if d.kind == "grid":
                    params[d.key] = chosen[d.key]
                elif d.kind == "choice":
                    params[d.key] = d.values[int(rng.integers(len(d.values)))]
                else:  # rounded so that the name states the value exactly
                    low, high = d.values
                    u = rng.uniform(low, high) if d.kind == "uniform" else math.exp(rng.uniform(math.log(low), math.log(high)))
                    params[d.key] = float(f"{u:.4g}")
            trials.append((_name(params, sample if sweep.num_samples > 1 else None) or "trial", params))
    names = [n for n, _ in trials]
    if len(set(names)) != len(names):
        raise ConfigError("'sweep.parameters' give two trials the same name; make the values distinct")
    return trials


def _with(values: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    node = OmegaConf.create(values)
    for key, value in params.items():
        OmegaConf.update(node, key, value, merge=False, force_add=True)
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read a sweep config, apply ``key=value`` overrides (``sweep.*`` ones go to the sweep section) and
    validate the base config and every trial's config. Raises :class:`ConfigError` naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as exc:
        raise ConfigError(f"cannot parse config file '{path}': {exc}") from None
    if not isinstance(raw, dict) or "sweep" not in raw:
        raise ConfigError(f"'{path}' has no 'sweep' section (a sweep config is a run config plus 'sweep:')")
    sweep_raw = raw.pop("sweep")
    run_overrides, sweep_overrides = [], []
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override '{item}' must look like key=value")
        if item.startswith("sweep."):
            sweep_overrides.append(item[len("sweep."):])
        else:
            run_overrides.append(item)
    try:
        if run_overrides:
            raw = OmegaConf.to_container(OmegaConf.merge(raw, OmegaConf.from_dotlist(run_overrides)), resolve=True)
        if sweep_overrides:
            merged = OmegaConf.merge(OmegaConf.create(sweep_raw or {}), OmegaConf.from_dotlist(sweep_overrides))
            sweep_raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override: {str(exc).splitlines()[0]}") from None
    base = from_dict(raw)
    if base.data.conditions:
        raise ConfigError("'data.conditions' is not supported by sweeps yet (trials report pooled results only); "
                          "run each configuration with 'tfft run'")
    sweep = parse_sweep(sweep_raw)
    trials = []
    for name, params in expand(sweep):
        try:
            cfg = from_dict(_with(raw, params))
        except ConfigError as exc:
            raise ConfigError(f"sweep trial '{name}': {exc}") from None
        if cfg.finetune.backend == "local" and cfg.finetune.use_gpu:  # a trial's driver holds no GPU
            where = "" if base.finetune.backend == "local" and base.finetune.use_gpu else f"sweep trial '{name}': "
            raise ConfigError(f"{where}'finetune.backend' local trains in the trial's Tune driver, which holds no "
                              "GPU: use backend ray for GPU fine-tuning in a sweep")
        trials.append(TrialSpec(name, params, cfg))
    return Sweep(base, sweep, trials)
