"""Flow model, flow-matching loss and a closed-form Gaussian velocity (DESIGN.md sections 2, 6, 7).

Conventions (DESIGN.md section 2): t = 0 is noise x0 ~ N(0, I), t = 1 is data, and the linear (rectified-flow)
interpolant is x_t = t x1 + (1 - t) x0, whose conditional velocity is x1 - x0. A velocity field is any
`nn.Module` or callable `velocity(x: Tensor (n, d), t: Tensor (n,)) -> Tensor (n, d)`; a conditional one is also
called as `velocity(x, t, cond)` with cond a LongTensor (n,) of condition indices (`tfft.conditions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from tfft.conditions import call_velocity

__all__ = [
    "VelocityField",
    "VelocityMLP",
    "GaussianVelocity",
    "GaussianMixtureVelocity",
    "flow_matching_loss",
    "gaussian_velocity_coefficient",
]

VelocityField = Callable[..., Tensor]
"""`velocity(x (n, d), t (n,)) -> (n, d)`, or `velocity(x, t, cond (n,))` with conditions; an `nn.Module` qualifies."""


def _expand_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a time (scalar, (1,), (n,) or (n, 1)) to shape (n,) on x's device and dtype."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() > 1:
        raise ValueError(f"t must be a scalar or have shape (n,), got {tuple(t.shape)}")
    return t.expand(x.shape[0]) if t.numel() == 1 else t


def gaussian_velocity_coefficient(t: Tensor) -> Tensor:
    """c(t) = (2t - 1) / (t^2 + (1 - t)^2), the slope of the exact velocity for data N(m, I) (DESIGN.md section 6).

    With x_t = t x1 + (1 - t) x0, x1 ~ N(m, I): Cov(x1 - x0, x_t) = (2t - 1) I and Var(x_t) = (t^2 + (1-t)^2) I,
    so E[x1 - x0 | x_t = x] = m + c(t) (x - t m).
    """
    return (2.0 * t - 1.0) / (t * t + (1.0 - t) * (1.0 - t))


class VelocityMLP(nn.Module):
    """SiLU MLP velocity v_theta(x, t) on [x, phi(t)] with a Fourier time embedding phi.

    phi(t) = [sin(w_j t), cos(w_j t)]_{j < F/2}, frequencies w_j geometric in [1, 100] (t lives in [0, 1]).
    `self.config` holds the constructor arguments so that `VelocityMLP(**model.config)` rebuilds the architecture.
    With ``num_conditions`` C > 0 the model is conditional, v_theta(x, t, c) on [x, phi(t) + E c], E a learned
    embedding (C, F) (zero-initialised, so a fresh conditional model starts as its unconditional self);
    ``config`` holds ``num_conditions`` only when it is set, so unconditional configs are unchanged.

    Args:
        dim: data dimension d.
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        time_features: F, size of the time embedding (even, >= 2).
        num_conditions: C, the number of conditions (0: unconditional).
    """

    def __init__(
        self, dim: int, hidden: int = 128, depth: int = 3, time_features: int = 16, num_conditions: int = 0
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if time_features < 2 or time_features % 2:
            raise ValueError(f"time_features must be an even number >= 2, got {time_features}")
        self.config: dict[str, int] = {
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "time_features": time_features,
        }
        if num_conditions < 0:
            raise ValueError(f"num_conditions must be >= 0, got {num_conditions}")
        self.num_conditions = int(num_conditions)
        self.condition_embedding: nn.Embedding | None = None
        if num_conditions:
            self.config["num_conditions"] = int(num_conditions)
            self.condition_embedding = nn.Embedding(num_conditions, time_features)
            nn.init.zeros_(self.condition_embedding.weight)
        half = time_features // 2
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(100.0), half)))
        # phi(t) = sin(t [w, w] + [0, pi/2]): sines and cosines in one kernel (not persisted: derived)
        self.register_buffer("_phase_frequencies", self.frequencies.repeat(2), persistent=False)
        self.register_buffer("_phases", torch.cat([torch.zeros(half), torch.full((half,), math.pi / 2)]), persistent=False)
        layers: list[nn.Module] = [nn.Linear(dim + time_features, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def time_embedding(self, t: Tensor) -> Tensor:
        """phi(t): (n,) -> (n, F)."""
        return torch.sin(torch.addcmul(self._phases, t[:, None], self._phase_frequencies))

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """v_theta(x, t[, cond]): x (n, d), t scalar or (n,), cond (n,) condition indices -> (n, d)."""
        t = _expand_time(t, x)
        features = self.time_embedding(t)
        if self.condition_embedding is not None:
            if cond is None:
                raise ValueError(f"this VelocityMLP is conditional ({self.num_conditions} conditions): pass cond")
            features = features + self.condition_embedding(cond.to(device=x.device, dtype=torch.long))
        elif cond is not None:
            raise ValueError("this VelocityMLP is unconditional (num_conditions 0) but got cond")
        return self.net(torch.cat([x, features], dim=1))


class GaussianVelocity(nn.Module):
    """Exact velocity for data N(m, I): v(x, t) = m + c(t) (x - t m), c(t) = (2t - 1)/(t^2 + (1 - t)^2).

    With `mean=None` (m = 0) this is the closed-form base of DESIGN.md section 6, v(x, t) = c(t) x, valid in any
    dimension. It has no parameters; it is a module so that it can stand in for a trained model anywhere.

    Args:
        mean: m, shape (d,), or None for m = 0.
    """

    def __init__(self, mean: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        mean_tensor = None if mean is None else torch.as_tensor(mean, dtype=torch.get_default_dtype())
        if mean_tensor is not None and mean_tensor.dim() != 1:
            raise ValueError(f"mean must have shape (d,), got {tuple(mean_tensor.shape)}")
        self.mean: Tensor | None
        self.register_buffer("mean", mean_tensor)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """v(x, t): x (n, d), t scalar or (n,) -> (n, d)."""
        t = _expand_time(t, x)[:, None]
        slope = gaussian_velocity_coefficient(t)
        if self.mean is None:
            return slope * x
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        return mean + slope * (x - t * mean)


class GaussianMixtureVelocity(nn.Module):
    """Exact velocity for data sum_j pi_j N(m_j, s_j^2 I): a closed-form multi-modal (stiff) flow.

    Given component j, x_t = t x1 + (1 - t) x0 ~ N(t m_j, (t^2 s_j^2 + (1 - t)^2) I) and
    E[x1 - x0 | x_t = x, j] = m_j + (t s_j^2 - (1 - t)) / (t^2 s_j^2 + (1 - t)^2) (x - t m_j); the velocity is the
    posterior mixture of these over j. Near the boundary between modes it is steep in x at late t, which makes the
    adjoint of its flow huge there (DESIGN.md section 6, conditioning).

    Args:
        means: m_j, (J, d).
        stds: s_j, (J,).
        weights: pi_j, (J,), default uniform.
    """

    def __init__(self, means: Tensor | Sequence[Sequence[float]], stds: Tensor | Sequence[float],
                 weights: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        m = torch.as_tensor(means, dtype=torch.get_default_dtype())
        s = torch.as_tensor(stds, dtype=torch.get_default_dtype())
        if m.dim() != 2 or s.shape != (m.shape[0],) or not bool((s > 0).all()):
            raise ValueError(f"means must be (J, d) and stds (J,) positive; got {tuple(m.shape)}, {tuple(s.shape)}")
        pi = torch.full((m.shape[0],), 1.0 / m.shape[0]) if weights is None else torch.as_tensor(weights, dtype=m.dtype)
        if pi.shape != s.shape or not bool((pi > 0).all()):
            raise ValueError("weights must be (J,) and positive")
        self.register_buffer("means", m)
        self.register_buffer("stds", s)
        self.register_buffer("log_weights", torch.log(pi / pi.sum()))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """v(x, t): x (n, d), t scalar or (n,) -> (n, d)."""
        t = _expand_time(t, x)[:, None, None]  # (n, 1, 1)
        means = self.means.to(x)[None]  # (1, J, d)
        var_data = self.stds.to(x).pow(2)[None, :, None]  # (1, J, 1)
        centre = t * means
        var_t = t * t * var_data + (1.0 - t) ** 2  # (n, J, 1)
        diff = x[:, None, :] - centre  # (n, J, d)
        d = x.shape[1]
        log_post = self.log_weights.to(x)[None] - 0.5 * (diff.pow(2).sum(2) / var_t[..., 0] + d * torch.log(var_t[..., 0]))
        post = torch.softmax(log_post, dim=1)[..., None]  # (n, J, 1)
        velocity = means + (t * var_data - (1.0 - t)) / var_t * diff
        return (post * velocity).sum(dim=1)


def flow_matching_loss(
    velocity: VelocityField,
    x1: Tensor,
    *,
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    x0: Tensor | None = None,
    cond: Tensor | None = None,
) -> Tensor:
    """Rectified-flow conditional flow-matching loss, optionally weighted (DESIGN.md sections 2 and 7).

    L = sum_i w_i || v(x_t_i, t_i) - (x1_i - x0_i) ||^2,   x_t_i = t_i x1_i + (1 - t_i) x0_i,
    with fresh t_i ~ U(0, 1) and x0_i ~ N(0, I); w_i = 1/n without weights, otherwise the given non-negative
    weights normalised to sum to 1 (the weighted flow matching of section 7 with w_i ∝ exp(g(x_i)/gamma)).

    Draw order with a generator: t = rand(n), then x0 = randn(n, d), so a seeded call is reproducible.

    Args:
        velocity: v(x (n, d), t (n,)) -> (n, d).
        x1: data samples, (n, d).
        weights: optional non-negative sample weights, (n,); need not be normalised.
        generator: optional torch.Generator for t and x0.
        t: optional fixed times, (n,), instead of fresh U(0, 1) draws.
        x0: optional fixed noise, (n, d), instead of fresh N(0, I) draws.
        cond: optional condition indices (n,), passed to the velocity (`tfft.conditions.call_velocity`).

    Returns:
        Scalar loss.
    """
    if x1.dim() != 2:
        raise ValueError(f"x1 must have shape (n, d), got {tuple(x1.shape)}")
    n = x1.shape[0]
    if t is None:
        t = torch.rand(n, generator=generator, device=x1.device, dtype=x1.dtype)
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if t.shape != (n,) or x0.shape != x1.shape:
        raise ValueError(f"t must be (n,) and x0 (n, d); got {tuple(t.shape)} and {tuple(x0.shape)}")
    x_t = t[:, None] * x1 + (1.0 - t[:, None]) * x0
    squared_error = (call_velocity(velocity, x_t, t, cond) - (x1 - x0)).pow(2).sum(dim=1)
    if weights is None:
        return squared_error.mean()
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape (n,) = ({n},), got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite and non-negative")
    total = weights.sum()
    if not bool(total > 0):
        raise ValueError("weights must not all be zero")
    weights = (weights / total).to(dtype=squared_error.dtype)
    return (weights * squared_error).sum()
