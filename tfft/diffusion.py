r"""A VP diffusion model (eps or v prediction) as the linear-interpolant flow of tfft, by a change of variables.

tfft's flow (DESIGN.md section 2): x_tau = tau x1 + (1 - tau) x0, tau = 0 noise x0 ~ N(0, I), tau = 1 data x1,
velocity v(x, tau) = E[x1 - x0 | x_tau = x].

A variance-preserving diffusion at discrete timestep k has the state z = a x1 + s eps with a = sqrt(abar_k),
s = sqrt(1 - abar_k) (abar = the scheduler's ``alphas_cumprod``, decreasing in k), and its network predicts
eps_hat(z, k) = E[eps | z] (``epsilon``) or v_hat = a eps - s x1 (``v_prediction``, so that, with a^2 + s^2 = 1,
eps_hat = s z + a v_hat and x1_hat = a z - s v_hat).

Change of variables. Dividing by a + s,

    z / (a + s) = tau x1 + (1 - tau) eps,   tau = a / (a + s),

so the VP state is (a + s) times the linear interpolant at time tau, with x0 = eps: the two processes are the
same random variables, and E[eps | z] = E[x0 | x_tau]. Conversely a flow time tau needs the noise level with
s/a = (1 - tau)/tau, i.e. the log signal-to-noise ratio

    lambda(tau) = log(abar / (1 - abar)) = 2 log(tau / (1 - tau)),

found on the schedule by interpolating lambda_k = log(abar_k / (1 - abar_k)) linearly in k (a fractional
timestep u; the network's time embedding takes it as a float). At the schedule's own timesteps u = k exactly.

Velocity. With z = (a + s) x, eps_hat = eps_hat(z, u) and x1_hat = (z - s eps_hat)/a = (x - (1 - tau) eps_hat)/tau:

    v(x, tau) = x1_hat - eps_hat = (x - eps_hat) / tau = (x1_hat - x) / (1 - tau).

The three forms are equal; the wrapper uses (x1_hat - x)/(1 - tau) for tau < 1/2 and (x - eps_hat)/tau for
tau >= 1/2, whose denominators stay >= 1/2.

Sampling. Euler on this velocity between two schedule times is DDIM (eta = 0) exactly: with eps_hat frozen over
a step, x' = x + (tau' - tau)(x - eps_hat)/tau = (tau'/tau) x + (1 - tau'/tau) eps_hat, which is DDIM's
z' = a' x1_hat + s' eps_hat divided by a' + s'. A tfft grid through the schedule's times reproduces DDIM to
rounding, starting from x = z_K / (a_K + s_K) at tau_K (DDIM treats its start noise z_K as the state at its
first timestep K).

Endpoints. The schedule covers tau in [tau_min, tau_max], tau_min = a_last/(a_last + s_last) at the noisiest
timestep and tau_max = a_first/(a_first + s_first) at the least noisy one: [0.0063, 0.990] for DDPM's linear
betas (1e-4 to 0.02 over 1000 steps), [0.064, 0.97] for Stable Diffusion's scaled-linear ones. Outside, abar is clipped to its last/first value: the network is evaluated at the clipped
level tau_c (input z = (a_c + s_c) x, timestep T - 1 or 0), and

- tau < tau_min: the data estimate x1_hat of the noisiest level is held, v = (x1_hat - x)/(1 - tau); at tau = 0
  this is x1_hat - x (the exact velocity there is E[x1] - x);
- tau > tau_max: the noise estimate eps_hat of the least noisy level is held, v = (x - eps_hat)/tau; at tau = 1
  this is x - eps_hat.

Both are finite and continuous at tau_min and tau_max. They are the network's best guesses, not its training
distribution: a flow run from tau = 0 passes through [0, tau_min) with the held data estimate, where DDIM starts
at tau_min from pure noise instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tfft.user_model import share_child_state

__all__ = ["PREDICTION_TYPES", "VPDiffusionFlow", "log_snr", "timestep_for_log_snr", "alpha_bar_at", "flow_time"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def log_snr(alpha_bar: Tensor) -> Tensor:
    """lambda = log(abar / (1 - abar)), elementwise."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def flow_time(alpha_bar: Tensor) -> Tensor:
    """tau = a / (a + s), a = sqrt(abar), s = sqrt(1 - abar): the flow time of a VP noise level."""
    a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    return a / (a + s)


def timestep_for_log_snr(alphas_cumprod: Tensor, target: Tensor) -> Tensor:
    """Fractional timestep u with lambda(u) = target, lambda linear in u between the schedule's timesteps;
    target is clipped to [lambda_{T-1}, lambda_0]. alphas_cumprod: (T,) decreasing; target: any shape."""
    lam = log_snr(alphas_cumprod.to(torch.float64))  # (T,), decreasing
    target = target.to(torch.float64).clamp(min=lam[-1], max=lam[0])
    ascending = -lam
    k = torch.searchsorted(ascending, (-target).contiguous(), right=True).clamp(1, lam.numel() - 1) - 1
    lo, hi = lam[k], lam[k + 1]
    return k.to(torch.float64) + (lo - target) / (lo - hi)


def alpha_bar_at(alphas_cumprod: Tensor, u: Tensor) -> Tensor:
    """abar at fractional timesteps u (clipped to [0, T - 1]): sigmoid of the linearly interpolated lambda."""
    lam = log_snr(alphas_cumprod.to(torch.float64))
    u = u.to(torch.float64).clamp(0, lam.numel() - 1)
    k = u.floor().long().clamp(max=lam.numel() - 2)
    frac = u - k
    return torch.sigmoid(lam[k] + frac * (lam[k + 1] - lam[k]))


class VPDiffusionFlow(nn.Module):
    """tfft velocity ``forward(x (n, *shape), t (n,), cond) -> (n, *shape)`` of a VP diffusion network.

    Args:
        network: ``network(z (n, *shape), timestep (n,) float[, cond]) -> eps or v``; an output with a
            ``.sample`` attribute (diffusers) or a tuple is unwrapped to its tensor. ``cond`` is passed only
            when not None.
        alphas_cumprod: abar_k of the discrete scheduler, (T,), strictly decreasing in (0, 1).
        prediction_type: ``epsilon`` or ``v_prediction``.

    The wrapper's state dict is the network's (same keys), so the network's own checkpoint (e.g. a diffusers
    ``diffusion_pytorch_model.safetensors``) loads into it as it is.
    """

    def __init__(self, network: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be (T,), T >= 2, strictly decreasing in (0, 1)")
        tau_range = flow_time(abar[[-1, 0]])
        if not (tau_range[0] < 0.5 < tau_range[1]):
            raise ValueError(f"the schedule covers flow times [{float(tau_range[0]):.3g}, {float(tau_range[1]):.3g}]; "
                             "it must contain 1/2")
        self.network = network
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", abar, persistent=False)  # the schedule, not weights
        share_child_state(self, "network")  # the state dict is the network's: its own checkpoints load as they are

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        """v(x, tau), x (n, *shape), t = tau (n,) in [0, 1]."""
        tau = t.to(torch.float64)
        u = timestep_for_log_snr(self.alphas_cumprod, 2.0 * (torch.log(tau) - torch.log1p(-tau)))
        abar = alpha_bar_at(self.alphas_cumprod, u)  # the clipped level: equal to the target inside the range
        view = (-1,) + (1,) * (x.dim() - 1)
        a = abar.sqrt().to(x.dtype).view(view)
        s = (1.0 - abar).sqrt().to(x.dtype).view(view)
        z = (a + s) * x
        out = self.network(z, u.to(x.dtype)) if cond is None else self.network(z, u.to(x.dtype), cond)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        if self.prediction_type == "epsilon":
            eps, x1 = out, (z - s * out) / a
        else:
            eps, x1 = s * z + a * out, a * z - s * out
        tau_x = tau.to(x.dtype).view(view)
        early = (x1 - x) / (1.0 - tau_x).clamp(min=0.5)
        late = (x - eps) / tau_x.clamp(min=0.5)
        return torch.where(tau_x < 0.5, early, late)
