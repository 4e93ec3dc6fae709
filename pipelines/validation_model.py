"""The model's settings checked before any work: the built-in MLP's sizes, the user model's factory and
checkpoint, LoRA (``finetune.lora``) and activation checkpointing. Part of `pipelines.validation.validate`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, require as _require
from pipelines.schema import Config

__all__ = ["check_model"]


def check_model(cfg: Config, check_imports: bool) -> None:
    """``model.*``, ``finetune.gradient_checkpointing`` and ``finetune.lora.*``; a ConfigError names the key."""
    _check_model(cfg.model, check_imports)
    _require(not cfg.finetune.gradient_checkpointing or bool(cfg.model.target), "finetune.gradient_checkpointing",
             "needs a model.target whose network supports it (diffusers models); the built-in MLP has nothing to "
             "checkpoint")
    _check_lora(cfg, check_imports)


def _check_model(model: Any, check_imports: bool) -> None:
    """The model's settings; the data dimension against ``sample_shape`` is checked when data is drawn
    (`pipelines.pretrain`), the checkpoint's keys when it is loaded (`pipelines.models`)."""
    _require(model.hidden >= 1, "model.hidden", f"must be >= 1, got {model.hidden}")
    _require(model.depth >= 1, "model.depth", f"must be >= 1, got {model.depth}")
    _require(model.time_features >= 2, "model.time_features", f"must be >= 2, got {model.time_features}")
    shape = list(model.sample_shape)
    _require(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape), "model.sample_shape",
             f"must be a list of positive ints (empty: [d], the data dimension), got {shape}")
    _require(model.target or not model.kwargs, "model.kwargs",
             "go to model.target's factory; the built-in MLP takes model.hidden, model.depth, model.time_features")
    if model.checkpoint:
        path = Path(model.checkpoint).expanduser()
        _require(path.is_file(), "model.checkpoint", f"{model.checkpoint!r} is not a file")
        _require(path.suffix in (".pt", ".pth", ".safetensors"), "model.checkpoint",
                 f"must be a .pt, .pth or .safetensors file, got {model.checkpoint!r}")
    if model.target and check_imports:
        from rewards.base import import_object

        try:
            factory = import_object(model.target)
        except ValueError as exc:
            raise ConfigError(f"'model.target': {exc}") from None
        _require(callable(factory), "model.target", f"{model.target!r} is not callable")


def _check_lora(cfg: Config, check_imports: bool) -> None:
    """``finetune.lora``: ranges; with imports checked, the model is built on the driver and wrapped, so that a
    target pattern matching no module fails here (`pipelines.lora.check_lora`)."""
    lora = cfg.finetune.lora
    if not lora.enabled:
        return
    _require(lora.rank >= 1, "finetune.lora.rank", f"must be >= 1, got {lora.rank}")
    _require(lora.alpha is None or (math.isfinite(lora.alpha) and lora.alpha > 0), "finetune.lora.alpha",
             f"must be > 0 (empty: = rank), got {lora.alpha}")
    _require(math.isfinite(lora.dropout) and 0.0 <= lora.dropout < 1.0, "finetune.lora.dropout",
             f"must be in [0, 1), got {lora.dropout}")
    _require(all(isinstance(p, str) and p for p in lora.target_modules), "finetune.lora.target_modules",
             f"must be a list of non-empty module-name patterns (empty list: every nn.Linear), got {lora.target_modules}")
    if check_imports:
        from pipelines.lora import check_lora
        from pipelines.models import model_config

        shape = [int(s) for s in cfg.model.sample_shape]
        check_lora(lora, model_config(cfg.model, math.prod(shape) if shape else 1))  # names do not depend on d
