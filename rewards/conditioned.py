"""Conditions, batches and gradients of the image rewards (:class:`rewards.image.ConditionedReward` and kin).

    evaluate(x (n, d), cond: n prompts | None) -> RewardBatch (n,)      d r / d x: (n, d), invalid rows zero

- :func:`prompts_of`: ClipScore's n prompts, from ``cond`` or its ``prompt`` kwarg.
- :func:`values_batch`: (n,) values -> a float64 :class:`rewards.base.RewardBatch`, non-finite values invalid ('nan').
- :func:`evaluate_maybe_cond`: a reward's ``evaluate`` with ``cond`` when it takes one, else without.
- :func:`grad_with_cond`: rewards and their gradient through ``evaluate(x, cond=cond)`` by autograd.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from rewards.base import Reward, RewardBatch

__all__ = ["prompts_of", "values_batch", "evaluate_maybe_cond", "grad_with_cond"]


def prompts_of(cond: Sequence[str] | None, prompt: str | None, n: int) -> Sequence[str]:
    """``cond``, or ``prompt`` n times when it is None; ValueError without prompts or with len(cond) != n."""
    if cond is None:
        if prompt is None:
            raise ValueError("ClipScore needs prompts: pass cond, or set reward.kwargs.prompt")
        cond = [prompt] * n
    if len(cond) != n:
        raise ValueError(f"cond must hold one prompt per sample: {len(cond)} prompts for {n} samples")
    return cond


def values_batch(values: Tensor, like: Tensor) -> RewardBatch:
    """RewardBatch of (n,) values (graph kept) as float64 on ``like``'s device; non-finite values are invalid."""
    rewards = values.to(device=like.device, dtype=torch.float64)
    valid = torch.isfinite(rewards.detach())
    errors = None if bool(valid.all()) else ["" if v else "nan" for v in valid.tolist()]
    return RewardBatch(rewards, valid, errors)


def evaluate_maybe_cond(reward: Reward, x: Tensor, cond: Any) -> RewardBatch:
    """``reward.evaluate(x, cond=cond)`` when its ``evaluate`` has a ``cond`` parameter, else ``reward.evaluate(x)``."""
    takes_cond = "cond" in inspect.signature(reward.evaluate).parameters
    return reward.evaluate(x, cond=cond) if takes_cond else reward.evaluate(x)


def grad_with_cond(
    evaluate: Callable[..., RewardBatch], x: Tensor, cond: Sequence[str] | None
) -> tuple[RewardBatch, Tensor]:
    """Rewards of ``evaluate(x, cond=cond)`` for x (n, d) and d r / d x (n, d); rows of invalid samples are zero."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = evaluate(x, cond=cond)
        valid = out.valid & torch.isfinite(out.rewards.detach())
        grad = torch.zeros_like(x)
        if bool(valid.any()):
            (got,) = torch.autograd.grad(out.rewards[valid].sum(), x, allow_unused=True)
            grad = grad if got is None else got
    grad = torch.where(valid[:, None], grad, torch.zeros_like(grad)).detach()
    return RewardBatch(out.rewards.detach(), valid, out.errors), grad
