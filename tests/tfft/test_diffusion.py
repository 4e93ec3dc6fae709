"""tfft.diffusion: a VP eps/v network as the linear-interpolant flow.

(a) Closed form: the exact eps (and v) predictor of Gaussian data N(m, sd^2 I) must give the exact linear-interpolant
velocity of that Gaussian; at the clipped ends the documented held estimates.
(b) diffusers: a tiny random UNet2DModel with DDIMScheduler (eta = 0) against tfft's Euler sampler on the wrapped
flow from the same noise: equal to rounding on DDIM's own time grid (DDIM is Euler of this flow), and on a
uniform grid in tau the gap to DDIM shrinks with the step count (two first-order discretisations of one ODE).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from tfft.diffusion import VPDiffusionFlow, alpha_bar_at, flow_time, timestep_for_log_snr
from tfft.sampling import sample_ode
from tfft.user_model import FlatVelocity

T = 1000
SCHEDULE = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)  # DDPM's linear betas
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
SD = 0.7


class GaussianPredictor(nn.Module):
    """Exact E[eps | z] (or v = a E[eps | z] - s E[x1 | z]) for data N(MEAN, SD^2 I) at fractional timesteps."""

    def __init__(self, prediction_type: str) -> None:
        super().__init__()
        self.prediction_type = prediction_type

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        abar = alpha_bar_at(SCHEDULE, u)[:, None]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        var = a * a * SD**2 + s * s
        eps = s / var * (z - a * MEAN)
        x1 = MEAN + a * SD**2 / var * (z - a * MEAN)
        return eps if self.prediction_type == "epsilon" else a * eps - s * x1


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    """E[x1 - x0 | x_t = x] for x1 ~ N(m, sd^2 I): m + (t sd^2 - (1 - t))/(t^2 sd^2 + (1 - t)^2) (x - t m)."""
    t = t[:, None]
    return MEAN + (t * SD**2 - (1 - t)) / (t * t * SD**2 + (1 - t) ** 2) * (x - t * MEAN)


def gaussian_posterior_mean(x: Tensor, t: Tensor) -> Tensor:
    """E[x1 | x_t = x] = m + t sd^2 / (t^2 sd^2 + (1 - t)^2) (x - t m)."""
    t = t[:, None]
    return MEAN + t * SD**2 / (t * t * SD**2 + (1 - t) ** 2) * (x - t * MEAN)


TAU_MIN, TAU_MAX = (float(v) for v in flow_time(SCHEDULE[[-1, 0]]))


def test_schedule_interpolation_inverts():
    u = torch.linspace(0, T - 1, 577, dtype=torch.float64)
    lam = torch.log(alpha_bar_at(SCHEDULE, u)) - torch.log1p(-alpha_bar_at(SCHEDULE, u))
    assert torch.allclose(timestep_for_log_snr(SCHEDULE, lam), u, atol=1e-8)
    k = torch.arange(T)
    assert torch.allclose(alpha_bar_at(SCHEDULE, k.double()), SCHEDULE, rtol=1e-12)
    assert 0.006 < TAU_MIN < 0.007 and 0.989 < TAU_MAX < 0.991  # the linear DDPM schedule's range in flow time


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exact_gaussian_predictor_gives_the_exact_flow_velocity(prediction_type):
    flow = VPDiffusionFlow(GaussianPredictor(prediction_type), SCHEDULE, prediction_type)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    t = TAU_MIN + (TAU_MAX - TAU_MIN) * torch.rand(n, generator=gen, dtype=torch.float64)
    x = 2.0 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    got = flow(x, t)
    assert (got - gaussian_velocity(x, t)).abs().max() < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clipped_ends_hold_the_documented_estimates(prediction_type):
    flow = VPDiffusionFlow(GaussianPredictor(prediction_type), SCHEDULE, prediction_type)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t_value in (0.0, 0.3 * TAU_MIN, TAU_MIN):  # noisy end: the noisiest level's data estimate is held
        t = torch.full((5,), t_value, dtype=torch.float64)
        x1_hat = gaussian_posterior_mean(x, torch.full((5,), TAU_MIN, dtype=torch.float64))
        assert torch.allclose(flow(x, t), (x1_hat - x) / (1 - t_value), atol=1e-9)
    for t_value in (TAU_MAX, 0.5 * (TAU_MAX + 1), 1.0):  # clean end: the least noisy level's noise estimate
        t = torch.full((5,), t_value, dtype=torch.float64)
        tau = torch.full((5,), TAU_MAX, dtype=torch.float64)
        eps_hat = (x - tau[:, None] * gaussian_posterior_mean(x, tau)) / (1 - TAU_MAX)
        assert torch.allclose(flow(x, t), (x - eps_hat) / t_value, atol=1e-7)
    assert torch.isfinite(flow(x, torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0], dtype=torch.float64))).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prediction_type"):
        VPDiffusionFlow(GaussianPredictor("epsilon"), SCHEDULE, "sample")
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPDiffusionFlow(GaussianPredictor("epsilon"), SCHEDULE.flip(0))
    with pytest.raises(ValueError, match="must contain 1/2"):
        VPDiffusionFlow(GaussianPredictor("epsilon"), SCHEDULE[:50])  # never noisier than tau = 0.5


# ---- (b) against diffusers' own DDIM sampler --------------------------------------------------------------------

SHAPE = (2, 8, 8)
EXACT_TOLERANCE = 1e-4  # float32 rounding, relative to the samples' largest entry
N_SAMPLES = 4


def _unet_and_scheduler(prediction_type: str):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
        timestep_spacing="trailing", prediction_type=prediction_type,
    )
    return unet, scheduler


@torch.no_grad()
def _ddim(unet, scheduler, noise: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """diffusers' DDIM (eta = 0) from ``noise``; returns the sample and the timesteps used (descending)."""
    scheduler.set_timesteps(steps)
    z = noise.clone()
    for k in scheduler.timesteps:
        z = scheduler.step(unet(z, k).sample, k, z, eta=0.0).prev_sample
    return z, scheduler.timesteps.clone()


@torch.no_grad()
def _flow(unet, scheduler, prediction_type: str, noise: Tensor, grid: Tensor) -> Tensor:
    """tfft's Euler sampler on the wrapped flow along ``grid`` (from DDIM's first noise level to tau = 1); the
    noise z_K is DDIM's state at its first level, i.e. the flow state z_K / (a_K + s_K)."""
    abar = scheduler.alphas_cumprod.to(torch.float64)
    flow = FlatVelocity(VPDiffusionFlow(unet, abar, prediction_type), SHAPE)
    a0 = float(grid[0]) / (1 - float(grid[0]))  # a/s at the start level
    scale = math.sqrt(1 + a0 * a0) / (1 + a0)  # 1/(a + s) with a^2 + s^2 = 1
    x = sample_ode(flow, (noise * scale).reshape(len(noise), -1), grid.to(torch.float32))
    return x.reshape(noise.shape)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_is_euler_of_the_wrapped_flow_on_its_own_grid(prediction_type):
    unet, scheduler = _unet_and_scheduler(prediction_type)
    noise = torch.randn(N_SAMPLES, *SHAPE, generator=torch.Generator().manual_seed(0))
    for steps in (20, 100):
        want, timesteps = _ddim(unet, scheduler, noise, steps)
        taus = flow_time(scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()])
        grid = torch.cat([taus, torch.ones(1, dtype=torch.float64)])
        got = _flow(unet, scheduler, prediction_type, noise, grid)
        error = float((got - want).abs().max() / want.abs().max())
        print(f"{prediction_type}, {steps} steps, DDIM's grid: max relative difference {error:.2e}")
        assert error < EXACT_TOLERANCE, (steps, error)


def test_on_a_uniform_grid_the_gap_to_ddim_shrinks_with_steps():
    """Off DDIM's grid the two samplers are two Euler discretisations of one ODE: their gap is O(1/N) in the
    end, slower at first because the flow starts stiff (tau = 0.0063, where x1_hat = (z - s eps_hat)/a has
    a = 0.0063). Measured (max relative difference): about 7e-2 at 20 steps, 3.9e-2 at 100, 1e-2 at 500."""
    unet, scheduler = _unet_and_scheduler("epsilon")
    noise = torch.randn(N_SAMPLES, *SHAPE, generator=torch.Generator().manual_seed(0))
    tau_start = float(flow_time(scheduler.alphas_cumprod[-1:].to(torch.float64)))  # trailing spacing starts at T - 1
    gaps = {}
    for steps in (20, 100):
        want, _ = _ddim(unet, scheduler, noise, steps)
        grid = torch.linspace(tau_start, 1.0, steps + 1, dtype=torch.float64)
        got = _flow(unet, scheduler, "epsilon", noise, grid)
        gaps[steps] = float((got - want).abs().max() / want.abs().max())
    print(f"uniform grid in tau vs DDIM, max relative difference: {gaps}")
    assert gaps[20] < 0.1 and gaps[100] < 0.05 and gaps[100] < 0.7 * gaps[20]


def test_state_dict_is_the_networks():
    diffusers = pytest.importorskip("diffusers")
    unet, scheduler = _unet_and_scheduler("epsilon")
    flow = VPDiffusionFlow(unet, scheduler.alphas_cumprod)
    assert list(flow.state_dict()) == list(unet.state_dict())
    fresh = diffusers.UNet2DModel.from_config(unet.config)
    VPDiffusionFlow(fresh, scheduler.alphas_cumprod).load_state_dict(unet.state_dict())  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), unet.state_dict().values()))
