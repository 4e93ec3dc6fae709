"""LoRA fine-tuning through peft (``finetune.lora``): only low-rank adapters train, the base stays in place.

The adapters wrap the user's network (``model.target``'s module) or the built-in ``VelocityMLP``, the module a
user loads again with ``peft.PeftModel.from_pretrained(network, checkpoint_dir)``. A LoRA layer computes

    y = W x + b + (alpha / r) B A dropout(x),   A (r, in), B (out, r), B = 0 at the start,

so the wrapped model starts as the base model exactly. The base velocity that the solvers need (the lean
adjoint's drift, the anchored weighted loss) is the SAME network with the adapters switched off
(:class:`AdapterOffVelocity`, peft's ``disable_adapter()``): the model is held once. With the adapters off a
LoRA layer returns ``W x + b`` and never reads A or B, so the base path is the pretrained network bit for bit and
no gradient of it can reach an adapter.

What leaves a run: the adapter in peft's format (``save_pretrained``: ``adapter_model.safetensors`` +
``adapter_config.json``) and the merged state dict W + (alpha / r) B A of the user's network (keys as without
LoRA), which is what ``checkpoint/model.pt`` and the evaluation bank's sampler actors use: they build the plain
network from the unchanged model config dict and need no peft.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pipelines.adapter_off import AdapterOffVelocity, adapter_aware_checkpoint, enable_checkpointing
from pipelines.config import ConfigError
from pipelines.lora_io import (
    adapter_state,
    load_adapter,
    merged_state,
    read_adapter,
    save_lora_checkpoint,
)

__all__ = [
    "LoraSettings",
    "LoraModel",
    "AdapterOffVelocity",
    "lora_settings",
    "linear_names",
    "resolve_targets",
    "check_lora",
    "build_lora_model",
    "wrap_lora",
    "enable_checkpointing",
    "adapter_aware_checkpoint",
    "adapter_state",
    "load_adapter",
    "merged_state",
    "save_lora_checkpoint",
    "read_adapter",
    "count_parameters",
    "lora_log_line",
]



@dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape: rank r, scale numerator alpha (scale alpha / r), dropout on the adapter's input,
    ``target_modules`` as peft takes a list (a name matches a pattern equal to it or ending in ``.pattern``;
    empty: every ``nn.Linear`` of the network by its full name)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain values (they travel to the training workers and into checkpoints)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoraSettings":
        return cls(int(values["rank"]), float(values["alpha"]), float(values.get("dropout", 0.0)),
                   tuple(values.get("target_modules") or ()))


def lora_settings(lora: Any) -> LoraSettings | None:
    """``finetune.lora`` as :class:`LoraSettings` (alpha defaults to the rank); None when LoRA is off."""
    if not lora.enabled:
        return None
    alpha = float(lora.rank if lora.alpha is None else lora.alpha)
    return LoraSettings(int(lora.rank), alpha, float(lora.dropout), tuple(str(p) for p in lora.target_modules))


def linear_names(network: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` in ``network`` (the default targets: nothing excluded)."""
    return [name for name, module in network.named_modules() if isinstance(module, nn.Linear) and name]


def _peft_config(settings: LoraSettings, network: nn.Module) -> Any:
    from peft import LoraConfig

    if settings.target_modules:
        targets: Any = list(settings.target_modules)
    else:  # exact full names: a suffix match on a bare name could catch a non-Linear module
        names = linear_names(network)
        if not names:
            raise ConfigError("'finetune.lora.target_modules' is empty and the network has no nn.Linear layer; "
                              "name the modules to adapt")
        targets = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, init_lora_weights=True)


def resolve_targets(settings: LoraSettings, network: nn.Module) -> list[str]:
    """The full names of the modules that get an adapter; a pattern matching no module is a ConfigError."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in network.named_modules() if name]
    for pattern in settings.target_modules:
        probe = LoraConfig(r=1, target_modules=[pattern])
        if not any(check_target_module_exists(probe, name) for name in names):
            raise ConfigError(f"'finetune.lora.target_modules' pattern {pattern!r} matches no module of the network "
                              f"(modules: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    config = _peft_config(settings, network)
    return [name for name in names if check_target_module_exists(config, name)]


@dataclass
class LoraModel:
    """The flat velocity with adapters (train it), its ``PeftModel`` (save it) and the base velocity view."""

    velocity: nn.Module
    peft: nn.Module
    base: AdapterOffVelocity
    targets: list[str]

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.velocity.parameters() if p.requires_grad]


def _network(model_config: dict[str, Any], state: dict[str, Tensor] | None) -> nn.Module:
    """The module the adapters wrap: the user's network or the built-in MLP, with ``state`` loaded."""
    from pipelines.models import build_network
    from tfft.model import VelocityMLP

    network = build_network(model_config) if "target" in model_config else VelocityMLP(**model_config)
    if state is not None:
        network.load_state_dict(state)
    return network


def build_lora_model(
    model_config: dict[str, Any], base_state: dict[str, Tensor] | None, settings: LoraSettings,
    adapter: dict[str, Tensor] | None = None,
) -> LoraModel:
    """The base network with ``base_state`` wrapped in LoRA adapters (fresh, or ``adapter`` in peft's format).

    Every non-adapter parameter has ``requires_grad=False``: an optimiser given :meth:`LoraModel.trainable` and
    DDP (which all-reduces only parameters that require gradients) see only the adapters.
    """
    network = _network(model_config, base_state)
    flat = None if "target" not in model_config else (model_config["sample_shape"], model_config.get("conditions"))
    return wrap_lora(network, settings, adapter, flat=flat)


def wrap_lora(
    network: nn.Module, settings: LoraSettings, adapter: dict[str, Tensor] | None = None,
    flat: tuple[Sequence[int], Sequence[Any] | None] | None = None,
) -> LoraModel:
    """``network`` (modified in place) wrapped in LoRA adapters, fresh or ``adapter`` in peft's format.

    ``flat`` = (sample_shape, conditions): the network is a user model ``forward(x (n, *shape), t, cond)``, seen
    by the solvers through `tfft.user_model.FlatVelocity`; None: it already takes flat x (n, d).
    """
    from peft import get_peft_model

    from tfft.user_model import FlatVelocity

    targets = resolve_targets(settings, network)
    with torch.random.fork_rng(devices=[]):  # the adapters' A from a fixed seed: runs are reproducible
        torch.manual_seed(0)
        peft_model = get_peft_model(network, _peft_config(settings, network))
    if adapter is not None:
        load_adapter(peft_model, adapter)
    velocity: nn.Module = peft_model if flat is None else FlatVelocity(peft_model, flat[0], flat[1])
    return LoraModel(velocity, peft_model, AdapterOffVelocity(velocity, peft_model), targets)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``module`` (adapters included in the total)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_log_line(settings: LoraSettings, trainable: int, total: int) -> str:
    """``[finetune] LoRA rank r: 12,345 trainable of 1,234,567 parameters (1.0%)``."""
    share = 100.0 * trainable / max(total, 1)
    return f"[finetune] LoRA rank {settings.rank}: {trainable:,} trainable of {total:,} parameters ({share:.1f}%)"


def check_lora(lora: Any, model_config: dict[str, Any]) -> None:
    """``finetune.lora`` against the model: built on the driver (on the meta device when the factory allows it,
    so no weights are allocated) and wrapped, so that a bad pattern fails before Ray starts."""
    settings = lora_settings(lora)
    if settings is None:
        return
    from peft import get_peft_model

    try:
        with torch.device("meta"):
            network = _network(model_config, None)
    except Exception:  # noqa: BLE001 - a factory that cannot build on the meta device (reads a file, calls .item()):
        network = _network(model_config, None)  # built for real, where a broken factory raises its ConfigError
    resolve_targets(settings, network)
    try:
        get_peft_model(network, _peft_config(settings, network))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"'finetune.lora.target_modules': peft cannot adapt them: {exc}") from None
