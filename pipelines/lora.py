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

import copy
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pipelines.config import ConfigError

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

ADAPTER_FILE = "adapter_model.safetensors"
MERGED_FILE = "merged.safetensors"


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


class AdapterOffVelocity(nn.Module):
    """v_base(x, t) = the LoRA velocity with its adapters switched off (peft's ``disable_adapter()``).

    The network runs in eval mode here (restored afterwards), as the separate frozen base does without LoRA.
    Holds a reference to the model, not a copy: no second set of weights. Its forward is the base network's
    forward exactly (a disabled LoRA layer returns its base layer's output), so vector-Jacobian products taken
    through it are the base velocity's and touch no adapter parameter. The reference is kept outside the
    module tree, so that this wrapper has no parameters of its own and moving or saving it does nothing.

    Args:
        velocity: the flat LoRA velocity v(x (n, d), t (n,)) -> (n, d) (not a DDP wrapper).
        peft_model: the ``PeftModel`` inside it whose adapters are switched off.
    """

    def __init__(self, velocity: nn.Module, peft_model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_velocity", velocity)
        object.__setattr__(self, "_peft", peft_model)
        object.__setattr__(self, "_checkpointable", None)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """x (n, d), t scalar or (n,), cond (n,) condition indices or None -> the base velocity (n, d), in eval
        mode like a separate frozen base."""
        velocity = self._velocity
        training = velocity.training
        suspended = [m for m in self._checkpointed_blocks() if m.gradient_checkpointing
                     and getattr(m, "_gradient_checkpointing_func", None) is not adapter_aware_checkpoint]
        if training:
            velocity.eval()
        for module in suspended:
            module.gradient_checkpointing = False
        token = _ADAPTERS_OFF.set(True)
        try:
            with self._peft.disable_adapter():
                return velocity(x, t) if cond is None else velocity(x, t, cond)
        finally:
            _ADAPTERS_OFF.reset(token)
            for module in suspended:
                module.gradient_checkpointing = True
            if training:
                velocity.train()

    def _checkpointed_blocks(self) -> list[nn.Module]:
        """The blocks that can checkpoint their activations (diffusers: a ``gradient_checkpointing`` flag), found
        once. A block checkpointed by `enable_checkpointing` (`adapter_aware_checkpoint`) recomputes with the
        adapters and mode of its forward; one checkpointed otherwise (diffusers' own function) is not checkpointed
        during the base's call: its forward would be recomputed in the backward pass (the adjoint's vector-Jacobian
        product) after the adapters are back on, and the product would be the adapted velocity's."""
        if self._checkpointable is None:
            found = [m for m in self._velocity.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
            object.__setattr__(self, "_checkpointable", found)
        return self._checkpointable


_ADAPTERS_OFF: ContextVar[bool] = ContextVar("tfft_lora_adapters_off", default=False)
"""True inside `AdapterOffVelocity`'s call: the checkpointed blocks record it for their recomputation."""


@contextmanager
def _adapters_disabled_in(module: nn.Module) -> Iterator[None]:
    """The LoRA layers inside ``module`` switched off for the block (peft's ``enable_adapters``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_aware_checkpoint(module: nn.Module, *args: Any) -> Any:
    """Activation checkpointing of one block whose recomputation (in the backward pass) runs as its forward did:
    with the LoRA adapters off for the base velocity (`AdapterOffVelocity`, which also runs in eval mode), on for
    the model, and in the same train/eval mode. The base's vector-Jacobian products (the lean adjoint) are then
    checkpointed too, and stay the base's."""
    from torch.utils.checkpoint import checkpoint

    off, training = _ADAPTERS_OFF.get(), module.training

    def contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        return nullcontext(), _as_in_forward(module, off, training)

    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)


@contextmanager
def _as_in_forward(module: nn.Module, adapters_off: bool, training: bool) -> Iterator[None]:
    """The block's adapters (off when ``adapters_off``) and train/eval mode as in its forward, for a recomputation."""
    mode = module.training
    module.train(training)
    try:
        if adapters_off:
            with _adapters_disabled_in(module):
                yield
        else:
            yield
    finally:
        module.train(mode)


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
    peft_model = get_peft_model(network, _peft_config(settings, network))
    if adapter is not None:
        load_adapter(peft_model, adapter)
    velocity: nn.Module = peft_model if flat is None else FlatVelocity(peft_model, flat[0], flat[1])
    return LoraModel(velocity, peft_model, AdapterOffVelocity(velocity, peft_model), targets)


def enable_checkpointing(network: nn.Module) -> int:
    """Turn on activation checkpointing (`adapter_aware_checkpoint`) in every outermost submodule that supports it
    (diffusers' ``ModelMixin``: ``enable_gradient_checkpointing``); returns how many. None is a ConfigError naming
    ``finetune.gradient_checkpointing``."""
    found = [m for m in network.modules() if callable(getattr(m, "enable_gradient_checkpointing", None))
             and hasattr(m, "is_gradient_checkpointing")]
    outer = [m for m in found if not any(m is not o and any(m is c for c in o.modules()) for o in found)]
    if not outer:
        raise ConfigError("'finetune.gradient_checkpointing' is on, but the model has no module that supports it "
                          "(diffusers models do)")
    for module in outer:
        module.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_aware_checkpoint)
    return len(outer)


def adapter_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The adapter's weights in peft's saved format (keys without the adapter name), detached, on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter(peft_model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights (peft's format) into ``peft_model``; a key it does not have is an error."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"adapter keys not in the model: {unexpected[:5]}")


def merged_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The user network's state dict with every adapter merged, W + (alpha / r) B A (``peft_model`` untouched)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().cpu().clone() for k, v in merged.state_dict().items()}


def read_adapter(directory: str | Path) -> dict[str, Tensor]:
    """The adapter weights a run saved in ``directory`` (``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / ADAPTER_FILE), device="cpu")


def save_lora_checkpoint(
    directory: str | Path, lora: LoraModel, *, merge: bool,
) -> list[str]:
    """Write the adapter with ``save_pretrained`` into ``directory`` (and ``merged.safetensors`` when ``merge``);
    returns the files written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora.peft.save_pretrained(str(directory))
    files = [ADAPTER_FILE, "adapter_config.json"]
    if merge:
        state = {k: v.contiguous() for k, v in merged_state(lora.peft).items()}
        save_file(state, str(directory / MERGED_FILE))
        files.append(MERGED_FILE)
    return files


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
    except ConfigError:
        raise
    except Exception:  # a factory that cannot build on the meta device (it reads a file, calls .item(), ...)
        network = _network(model_config, None)
    resolve_targets(settings, network)
    try:
        get_peft_model(network, _peft_config(settings, network))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"'finetune.lora.target_modules': peft cannot adapt them: {exc}") from None
