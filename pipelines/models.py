"""The base model's architecture as a serialisable config dict, and the one function that builds it.

Two kinds, told apart by the dict's keys (DESIGN.md section 8: a model is a factory by import path):

- built-in: ``{"dim", "hidden", "depth", "time_features"}``, the constructor arguments of
  ``tfft.model.VelocityMLP`` (the dict every cache and checkpoint made before user models holds);
- user: ``{"dim", "target", "kwargs", "sample_shape"}``: ``import_object(target)(**kwargs)`` returns a module
  ``forward(x (n, *sample_shape), t (n,), cond) -> (n, *sample_shape)``, wrapped by ``tfft.user_model.FlatVelocity``.

With conditions (``data.conditions``) the built-in dict gains ``num_conditions`` (C) and the user dict gains
``conditions`` (the list of values): the factory is then called as ``factory(**kwargs, conditions=[...])`` and
the wrapper maps the library's condition indices to those values. Unconditional dicts are unchanged.

Either way :func:`build_model` returns a flat velocity ``v(x (n, dim), t (n,)) -> (n, dim)``; the Ray actors, the
training workers and the benchmarks all build through it from the dict that travels with the weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.config import ConfigError
from pipelines.schema import ModelConfig
from rewards.base import import_object
from tfft.model import VelocityMLP
from tfft.user_model import FlatVelocity

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "model_config",
    "sample_shape_of",
    "build_network",
    "build_model",
    "read_checkpoint",
    "load_checkpoint",
    "checkpoint_identity",
    "model_record",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
_SHOWN_KEYS = 5  # keys listed in a mismatch error


def model_config(model: ModelConfig, dim: int, conditions: list[Any] | None = None) -> dict[str, Any]:
    """The serialisable architecture of ``model`` for data of flat dimension ``dim`` (and ``conditions``, if any)."""
    if not model.target:
        config = {"dim": int(dim), "hidden": model.hidden, "depth": model.depth, "time_features": model.time_features}
        if conditions:
            config["num_conditions"] = len(conditions)
        return config
    shape = [int(s) for s in model.sample_shape] or [int(dim)]
    config = {"dim": int(dim), "target": model.target, "kwargs": _plain(model.kwargs), "sample_shape": shape}
    if conditions:
        config["conditions"] = list(conditions)
    return config


def sample_shape_of(config: dict[str, Any]) -> list[int]:
    """Shape of one sample: the user model's ``sample_shape``, ``[dim]`` for the built-in MLP."""
    return [int(s) for s in config.get("sample_shape") or [config["dim"]]]


def build_network(config: dict[str, Any]) -> nn.Module:
    """The user's module as its factory returns it (``model.target`` with ``model.kwargs``, and ``conditions`` when
    the config has them), unwrapped."""
    try:
        factory = import_object(config["target"])
    except ValueError as exc:
        raise ConfigError(f"'model.target': {exc}") from None
    extra = {"conditions": list(config["conditions"])} if config.get("conditions") else {}
    try:
        network = factory(**dict(config.get("kwargs") or {}), **extra)
    except Exception as exc:  # the factory's own error, with the setting that caused it
        raise ConfigError(f"'model.target' {config['target']!r} failed when called with model.kwargs "
                          f"{dict(config.get('kwargs') or {})!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(network, nn.Module):
        raise ConfigError(f"'model.target' {config['target']!r} must return a torch.nn.Module, "
                          f"got {type(network).__name__}")
    return network


def build_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The flat velocity ``v(x (n, dim), t (n,)) -> (n, dim)`` of a model config dict, with ``state_dict``
    loaded strictly when given (keys of the user's network; ``FlatVelocity`` adds no prefix)."""
    if "target" in config:
        model: nn.Module = FlatVelocity(build_network(config), config["sample_shape"], config.get("conditions"))
    else:
        model = VelocityMLP(**config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``; a tfft ``checkpoint/model.pt``
    blob gives its ``state_dict``) or ``.safetensors``."""
    path = Path(os.path.expanduser(str(path)))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ConfigError(f"'model.checkpoint' {str(path)!r} does not hold a state dict of tensors")
    return blob


def load_checkpoint(network: nn.Module, path: str | Path) -> None:
    """Load the state dict at ``path`` into ``network`` strictly; a mismatch is a one-line ConfigError."""
    state = read_checkpoint(path)
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(f"'model.checkpoint' {str(path)!r} does not match the model: missing keys "
                          f"{_first(missing)}, unexpected keys {_first(unexpected)}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same keys, other shapes
        raise ConfigError(f"'model.checkpoint' {str(path)!r} does not match the model: "
                          f"{' '.join(str(exc).split())[:400]}") from None


def checkpoint_identity(path: str) -> dict[str, Any]:
    """Content hash and size of a checkpoint file, so that a replaced file never reuses a cache entry."""
    path_obj = Path(os.path.expanduser(path))
    digest = hashlib.sha256()
    with open(path_obj, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path_obj.stat().st_size}


def model_record(config: dict[str, Any], checkpoint: str = "") -> dict[str, Any]:
    """What ``summary.json["model"]`` says about the base model: factory, its kwargs, sample shape, checkpoint."""
    builtin = "target" not in config
    return {
        "target": "tfft.model:VelocityMLP" if builtin else config["target"],
        "kwargs": {k: v for k, v in config.items() if k != "dim"} if builtin else config.get("kwargs", {}),
        **({"conditions": config["conditions"]} if config.get("conditions") else {}),
        "sample_shape": sample_shape_of(config),
        "dim": int(config["dim"]),
        "checkpoint": checkpoint,
    }


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS]) or "none"
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > _SHOWN_KEYS else ''}]"


def _plain(value: Any) -> Any:
    """Plain dicts, lists and scalars (OmegaConf containers become Python ones), for torch.save(weights_only)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

