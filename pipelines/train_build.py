"""What a fine-tuning worker builds from its `pipelines.finetune_job.FinetuneJob` (`pipelines.finetune.run_loop`):
the networks (full or LoRA), the solver with the pseudo-reward and how one step draws its input, and the model state
a checkpoint keeps. :func:`build_solver` builds the solver the job carries the data for: weighted flow matching on
the job's bank rows, else adjoint matching.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch

from pipelines.finetune_job import FinetuneJob

__all__ = ["build_models", "build_solver", "pseudo_reward_fn", "model_state", "load_model_state", "no_buffer_sync",
           "holdout_metrics"]

Step = Callable[[int, torch.Generator, int], Any]  # (local batch, the step's generator, its seed) -> StepResult


def build_models(job: FinetuneJob, device: Any) -> tuple[Any, Any, Any]:
    """(trained model, frozen base velocity, `pipelines.lora.LoraModel` or None) on ``device``.

    Without LoRA the base is a separate frozen copy. With ``job.lora`` the model is the base network with
    adapters (fresh, or ``job.init_adapter``), only they require gradients, and the base is the same model
    with its adapters switched off (`pipelines.lora.AdapterOffVelocity`): one copy of the weights.
    """
    from pipelines.lora import enable_checkpointing

    checkpointing = job.settings.gradient_checkpointing
    if job.lora is not None:
        from pipelines.lora import build_lora_model

        lora = build_lora_model(job.model_config, job.base_state, job.lora, adapter=job.init_adapter)
        if checkpointing:
            enable_checkpointing(lora.velocity)
            lora.base.checkpoint = job.settings.checkpoint_adjoint
        return lora.velocity.to(device), lora.base, lora
    from pipelines.models import build_model

    base = build_model(job.model_config, job.base_state).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    model = build_model(job.model_config, job.init_state or job.base_state).to(device)
    if checkpointing:
        enable_checkpointing(model)
    return model, base, None


def build_solver(job: FinetuneJob, model: torch.nn.Module, base: torch.nn.Module, device: Any) -> tuple[Any, Step]:
    """(solver, step): `tfft.solvers.WeightedFlowMatchingSolver` on the job's bank rows (``job.weighted``; a step
    draws ``local_batch`` of them), else `tfft.solvers.AdjointMatchingSolver` on the pseudo-reward of
    :func:`pseudo_reward_fn` (a step draws ``local_batch * oversample`` noises x0 and, with conditions, their
    condition indices uniformly)."""
    if job.weighted is not None:
        return _weighted(job, model, base, device)
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver

    ft = job.settings
    am = AdjointMatchingConfig(
        kl_weight=job.tilt.kl_weight, steps=job.sde_steps, late_fraction=ft.late_fraction, n_early=ft.n_early,
        normalize=ft.normalize, clip_quantile=ft.clip_quantile, clip_factor=ft.clip_factor, oversample=ft.oversample,
        fast=ft.fast_path, loss_chunk=ft.loss_chunk, adjoint_chunk=ft.adjoint_chunk,
        autocast=None if ft.autocast == "none" else getattr(torch, ft.autocast), reweight=ft.reweight,
    )
    adjoint = AdjointMatchingSolver(model, base, pseudo_reward_fn(job), am)
    n_conditions = len(job.conditions or ())

    def adjoint_step(local_batch: int, gen: torch.Generator, seed: int) -> Any:
        x0 = torch.randn(local_batch * ft.oversample, job.dim, generator=gen, device=device)
        cond = None
        if n_conditions:
            from tfft.conditions import uniform_conditions

            cond = uniform_conditions(x0.shape[0], n_conditions, generator=gen, device=device)
        return adjoint.step(x0, gen, cond)

    return adjoint, adjoint_step


def holdout_metrics(solver: Any) -> dict[str, float]:
    """``holdout_gain`` and ``holdout_gain_se`` of a solver that holds rows out (`tfft.holdout`), else nothing.
    Every worker computes them on the same rows with the same draws and the same (all-reduced) weights."""
    gain = getattr(solver, "holdout_gain", lambda: None)()
    return {} if gain is None else {"holdout_gain": gain[0], "holdout_gain_se": gain[1]}


def _weighted(job: FinetuneJob, model: torch.nn.Module, base: torch.nn.Module, device: Any) -> tuple[Any, Step]:
    """The weighted flow-matching solver on ``job.weighted``, anchored to the base with ``finetune.anchor``; the
    anchored one holds ``finetune.holdout_fraction`` of the rows out (the same split on every worker: the run's
    seed) for the guard's held-out check (`tfft.holdout`)."""
    from tfft.solvers import WeightedFlowMatchingSolver

    bank = job.weighted
    weighted = WeightedFlowMatchingSolver(
        model, torch.as_tensor(np.array(bank.x), dtype=torch.float32, device=device),  # a writable copy
        torch.as_tensor(np.array(bank.weights)), base=base if job.settings.anchor else None,
        time_power=job.settings.time_power, bank_cond=None if bank.cond is None else torch.as_tensor(np.array(bank.cond)),
        holdout_fraction=job.settings.holdout_fraction if job.holds_out else 0.0, holdout_seed=job.seed)

    def weighted_step(local_batch: int, gen: torch.Generator, seed: int) -> Any:
        return weighted.step(local_batch, gen, index_generator=torch.Generator().manual_seed(seed))

    return weighted, weighted_step


def pseudo_reward_fn(job: FinetuneJob) -> Callable[[torch.Tensor], Any]:
    """x1 -> PseudoReward from the user's reward (values and gradients) and the job's ``tilt``
    (`tfft.objective.Tilt.signal`: each row at its condition's threshold)."""
    from rewards.base import load_reward

    reward = load_reward(job.reward_target, job.reward_kwargs)
    tilt, conditions, grad_clip = job.tilt, job.conditions, job.settings.reward_grad_clip

    def fn(x1: torch.Tensor, cond: torch.Tensor | None = None) -> Any:
        values = {} if cond is None else {"cond": [conditions[i] for i in cond.tolist()]}
        out, grad_r = reward.evaluate_with_grad(x1.to(torch.float64), **values)
        return tilt.signal(out.rewards.to(torch.float64), grad_r.to(torch.float64), out.valid, cond,
                           grad_clip=grad_clip)

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
