"""What a fine-tuning worker builds from its loop config (`pipelines.finetune.run_loop`): the networks (full or
LoRA), the solver with the pseudo-reward and how one step draws its input, and the model state a checkpoint keeps.

Loop config keys read here: ``model_config``, ``base_state``, ``init_state``, ``lora``, ``init_adapter``,
``solver``, ``tilt`` (a `tfft.objective.Tilt`), ``reward_target``, ``reward_kwargs``, ``reward_grad_clip``,
``conditions``, ``dim`` and the solver's settings (see `pipelines.trainer.run_finetune`). :func:`build_solver` is
the worker's one branch on the solver's name (resolved by `pipelines.stages.preflight.resolve_plan`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["build_models", "build_solver", "pseudo_reward_fn", "model_state", "load_model_state", "no_buffer_sync"]

Step = Callable[[int, torch.Generator, int], Any]  # (local batch, the step's generator, its seed) -> StepResult


def build_models(config: dict[str, Any], device: Any) -> tuple[Any, Any, Any]:
    """(trained model, frozen base velocity, `pipelines.lora.LoraModel` or None) on ``device``.

    Without LoRA the base is a separate frozen copy. With ``config["lora"]`` the model is the base network with
    adapters (fresh, or ``config["init_adapter"]``), only they require gradients, and the base is the same model
    with its adapters switched off (`pipelines.lora.AdapterOffVelocity`): one copy of the weights.
    """
    from pipelines.lora import enable_checkpointing

    if config.get("lora"):
        from pipelines.lora import LoraSettings, build_lora_model

        lora = build_lora_model(config["model_config"], config["base_state"], LoraSettings.from_dict(config["lora"]),
                                adapter=config.get("init_adapter"))
        if config.get("gradient_checkpointing"):
            enable_checkpointing(lora.velocity)
        return lora.velocity.to(device), lora.base, lora
    from pipelines.models import build_model

    base = build_model(config["model_config"], config["base_state"]).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    model = build_model(config["model_config"], config.get("init_state") or config["base_state"]).to(device)
    if config.get("gradient_checkpointing"):
        enable_checkpointing(model)
    return model, base, None


def build_solver(config: dict[str, Any], model: torch.nn.Module, base: torch.nn.Module,
                 device: Any) -> tuple[Any, Step]:
    """(solver, step): `tfft.solvers.WeightedFlowMatchingSolver` on the config's bank (``solver: weighted``;
    a step draws ``local_batch`` bank rows), else `tfft.solvers.AdjointMatchingSolver` on the pseudo-reward of
    :func:`pseudo_reward_fn` (a step draws ``local_batch * oversample`` noises x0 and, with conditions, their
    condition indices uniformly)."""
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver, WeightedFlowMatchingSolver

    if config["solver"] == "weighted":
        bank_x = torch.as_tensor(np.array(config["bank_x"]), dtype=torch.float32, device=device)
        bank_cond = config.get("bank_cond")
        weighted = WeightedFlowMatchingSolver(
            model, bank_x, torch.as_tensor(np.array(config["bank_weights"])), base=base if config["anchor"] else None,
            time_power=config["time_power"], bank_cond=None if bank_cond is None else torch.as_tensor(np.array(bank_cond)))

        def weighted_step(local_batch: int, gen: torch.Generator, seed: int) -> Any:
            return weighted.step(local_batch, gen, index_generator=torch.Generator().manual_seed(seed))

        return weighted, weighted_step
    am = AdjointMatchingConfig(
        kl_weight=config["tilt"].kl_weight, steps=config["sde_steps"], late_fraction=config["late_fraction"],
        n_early=config["n_early"], normalize=config["normalize"], clip_quantile=config["clip_quantile"],
        clip_factor=config["clip_factor"],
        oversample=config["oversample"], fast=config["fast_path"], loss_chunk=config.get("loss_chunk", 0),
        autocast=None if config.get("autocast", "none") == "none" else getattr(torch, config["autocast"]),
        reweight=bool(config.get("reweight", False)),
    )
    adjoint = AdjointMatchingSolver(model, base, pseudo_reward_fn(config), am)
    n_conditions = len(config.get("conditions") or [])

    def adjoint_step(local_batch: int, gen: torch.Generator, seed: int) -> Any:
        x0 = torch.randn(local_batch * config["oversample"], config["dim"], generator=gen, device=device)
        cond = None
        if n_conditions:
            from tfft.conditions import uniform_conditions

            cond = uniform_conditions(x0.shape[0], n_conditions, generator=gen, device=device)
        return adjoint.step(x0, gen, cond)

    return adjoint, adjoint_step


def pseudo_reward_fn(config: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
    """x1 -> PseudoReward from the user's reward (values and gradients) and the loop config's ``tilt``
    (`tfft.objective.Tilt.signal`: each row at its condition's threshold)."""
    from rewards.base import load_reward

    reward = load_reward(config["reward_target"], config["reward_kwargs"])
    tilt = config["tilt"]
    conditions = config.get("conditions")

    def fn(x1: torch.Tensor, cond: torch.Tensor | None = None) -> Any:
        values = {} if cond is None else {"cond": [conditions[i] for i in cond.tolist()]}
        out, grad_r = reward.evaluate_with_grad(x1.to(torch.float64), **values)
        return tilt.signal(out.rewards.to(torch.float64), grad_r.to(torch.float64), out.valid, cond,
                           grad_clip=config["reward_grad_clip"])

    return fn


def model_state(model: torch.nn.Module, lora: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: its state dict, or with LoRA only the adapter (peft's format)."""
    if lora is not None:
        from pipelines.lora import adapter_state

        return adapter_state(lora.peft)
    return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}


def load_model_state(model: torch.nn.Module, lora: Any, state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`model_state`: the state dict, or with LoRA the adapter, loaded into ``model``."""
    if lora is not None:
        from pipelines.lora import load_adapter

        load_adapter(lora.peft, state)
    else:
        model.load_state_dict(state)


def no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "do not broadcast buffers in every forward" (renamed in torch 2.13)."""
    from torch.nn.parallel import DistributedDataParallel

    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if new else {"broadcast_buffers": False}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (the model itself when not wrapped)."""
    return model.module if hasattr(model, "module") else model
