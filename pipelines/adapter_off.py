"""The base velocity of a LoRA model without a second copy of the weights, and checkpointing that keeps it exact.

`AdapterOffVelocity` is the LoRA network with its adapters switched off (peft's ``disable_adapter()``) for the
call: v_base(x, t) for the solvers (the lean adjoint's vector-Jacobian products, the anchored weighted loss).
Activation checkpointing recomputes a block's forward in the backward pass, after the call has returned and the
adapters are on again; `adapter_aware_checkpoint` (installed by `enable_checkpointing`, ``finetune.
gradient_checkpointing``) recomputes each block with the adapters and the train/eval mode of its forward, so the
base's products stay the base's, and blocks checkpointed otherwise (diffusers' own function) are not
checkpointed during the base's call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

from torch import Tensor, nn

from pipelines.config import ConfigError

__all__ = ["AdapterOffVelocity", "adapter_aware_checkpoint", "enable_checkpointing"]


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

    Attributes:
        checkpoint: whether blocks checkpointed by `enable_checkpointing` stay checkpointed in the base's call
            (``finetune.checkpoint_adjoint``): True, the lean adjoint's vector-Jacobian products recompute each
            block (least memory); False, they keep their activations (one forward pass less per adjoint step).
    """

    def __init__(self, velocity: nn.Module, peft_model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_velocity", velocity)
        object.__setattr__(self, "_peft", peft_model)
        object.__setattr__(self, "_checkpointable", None)
        self.checkpoint = True

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """x (n, d), t scalar or (n,), cond (n,) condition indices or None -> the base velocity (n, d), in eval
        mode like a separate frozen base."""
        velocity = self._velocity
        training = velocity.training
        suspended = [m for m in self._checkpointed_blocks() if m.gradient_checkpointing and (
            not self.checkpoint or getattr(m, "_gradient_checkpointing_func", None) is not adapter_aware_checkpoint)]
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
