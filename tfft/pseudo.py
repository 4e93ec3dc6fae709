"""The pseudo-reward's value and gradient on a batch of samples, from the reward's values and gradients.

DESIGN.md sections 3 and 6: g = (r - eta)_+ / alpha (right) or -(eta - r)_+ / alpha (left), and
grad g = 1{r beyond eta} grad r / alpha; ``eta=None`` is the expected-reward objective g = r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.target import pseudo_reward, pseudo_reward_grad_scale

__all__ = ["PseudoReward", "pseudo_reward_signal"]


@dataclass(frozen=True)
class PseudoReward:
    """What the adjoint-matching solver needs of the reward at X_1 (n samples, d dimensions).

    Attributes:
        value: g(X_1), (n,), 0 where invalid.
        grad: grad g(X_1), (n, d), 0 where invalid.
        valid: (n,) bool: the reward and its gradient are finite.
        reward: r(X_1), (n,), NaN where invalid (for logging).
    """

    value: Tensor
    grad: Tensor
    valid: Tensor
    reward: Tensor

    @property
    def active(self) -> Tensor:
        """(n,) bool: valid samples where grad g is not zero (beyond the threshold)."""
        return self.valid & (self.grad != 0).any(dim=1)


def pseudo_reward_signal(
    rewards: Tensor,
    grad_rewards: Tensor,
    valid: Tensor,
    *,
    eta: float | Tensor | None,
    side: str,
    alpha: float,
    grad_clip: float = 0.0,
) -> PseudoReward:
    """g and grad g from r (n,), grad r (n, d) and a validity mask (n,).

    ``eta`` is one threshold, or a tensor (n,) of per-row thresholds (with conditions: each row's condition's
    eta*_c, `tfft.conditions.row_values`).

    ``grad_clip > 0`` first caps each sample's ||grad r|| at that value (rewards with steep walls, such as atom
    clashes in an energy, must not swamp a batch). A sample whose reward or gradient is not finite is invalid.
    """
    if rewards.dim() != 1 or grad_rewards.dim() != 2 or grad_rewards.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"rewards must be (n,) and grad_rewards (n, d); got {tuple(rewards.shape)}, {tuple(grad_rewards.shape)}"
        )
    if valid.shape != rewards.shape:
        raise ValueError(f"valid must have shape {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0: off), got {grad_clip}")
    valid = valid.to(torch.bool) & torch.isfinite(rewards) & torch.isfinite(grad_rewards).all(dim=1)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    grad_r = torch.where(valid[:, None], grad_rewards, torch.zeros_like(grad_rewards))
    if grad_clip > 0:
        norms = grad_r.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad_r = grad_r * (grad_clip / norms).clamp(max=1.0)
    scale = pseudo_reward_grad_scale(r, eta=eta, side=side, alpha=alpha)
    scale = torch.where(valid, scale, torch.zeros_like(scale))
    value = torch.where(valid, pseudo_reward(r, eta=eta, side=side, alpha=alpha), torch.zeros_like(r))
    reward = torch.where(valid, rewards, torch.full_like(rewards, float("nan")))
    return PseudoReward(value=value, grad=scale[:, None] * grad_r, valid=valid, reward=reward)
