"""pipelines.adapters.stable_diffusion_3 on a tiny random SD3-class directory (pipelines.adapters.tiny).

The sign and time convention (v = -u at sigma = 1 - t) against FlowMatchEulerDiscreteScheduler.step, then the whole
sampler: Euler on the adapter's velocity along t_k = 1 - sigma_k reproduces StableDiffusion3Pipeline's latents from
the same noise and prompts, without and with classifier-free guidance; the state dict is the transformer's; prompt
(hidden, pooled) pairs are encoded once each.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from pipelines.adapters.stable_diffusion import stable_diffusion  # noqa: E402
from pipelines.adapters.stable_diffusion_3 import stable_diffusion_3  # noqa: E402
from pipelines.adapters.tiny import write_tiny_sd3  # noqa: E402
from pipelines.config import ConfigError  # noqa: E402
from tfft.sampling import sample_ode  # noqa: E402

SHAPE = (4, 8, 8)
PROMPTS = ["a photo of a cat", "red car", "a dog"]
TOLERANCE = 1e-5  # float32 rounding relative to the largest latent entry (measured: 1.2e-7, 2.4e-7)
TOKENS = 8  # T5 tokens (zeros without a T5): short, for speed


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "sd3")


def test_scheduler_step_is_euler_of_minus_the_output_in_t():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(7)
    gen = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, *SHAPE, generator=gen), torch.randn(2, *SHAPE, generator=gen)
    sigmas = scheduler.sigmas
    for k, timestep in enumerate(scheduler.timesteps):
        assert torch.isclose(timestep, sigmas[k] * 1000)  # the network's timestep is sigma T
        want = scheduler.step(u, timestep, x).prev_sample
        t, t_next = 1 - sigmas[k], 1 - sigmas[k + 1]
        assert torch.allclose(want, x + (t_next - t) * (-u), atol=1e-6)  # Euler in t with v = -u
    assert sigmas[0] == 1 and sigmas[-1] == 0  # t runs from noise (0) to data (1)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_euler_on_the_sigma_grid_is_the_sd3_pipeline(sd3_dir, guidance_scale):
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True,
                                                              text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), *SHAPE, generator=torch.Generator().manual_seed(0))
    want = pipe(PROMPTS, num_inference_steps=10, guidance_scale=guidance_scale, latents=noise.clone(), height=16,
                width=16, max_sequence_length=TOKENS, output_type="latent").images
    flow = stable_diffusion_3(str(sd3_dir), guidance_scale=guidance_scale, max_sequence_length=TOKENS)
    assert flow.sample_shape == SHAPE
    grid = 1 - pipe.scheduler.sigmas.to(torch.float64)

    def velocity(x, t):
        return flow(x.reshape(-1, *SHAPE), t, PROMPTS).reshape(len(x), -1)

    with torch.no_grad():
        got = sample_ode(velocity, noise.reshape(len(PROMPTS), -1), grid.float()).reshape(noise.shape)
    error = float((got - want).abs().max() / want.abs().max())
    print(f"guidance {guidance_scale}: max relative difference to StableDiffusion3Pipeline {error:.1e}")
    assert error < TOLERANCE


def test_state_prompts_and_bad_directories(sd3_dir, tmp_path):
    flow = stable_diffusion_3(str(sd3_dir), conditions=PROMPTS, prompt="a dog", max_sequence_length=TOKENS)
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(str(sd3_dir / "transformer"), local_files_only=True)
    assert list(flow.state_dict()) == list(transformer.state_dict())
    torch.manual_seed(1)
    other = diffusers.SD3Transformer2DModel.from_config(transformer.config)
    flow.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(flow.transformer.state_dict().values(), other.state_dict().values()))
    assert flow.prompts.calls == 1
    with torch.no_grad():
        x, t = torch.randn(3, *SHAPE), torch.rand(3)
        assert torch.equal(flow(x, t), flow(x, t, ["a dog"] * 3))
        flow(x, t, PROMPTS[::-1])
    assert flow.prompts.calls == 1
    with pytest.raises(ConfigError, match=r"'model\.kwargs\.path': .* has no unet/"):
        stable_diffusion(str(sd3_dir))  # the VP adapter on a rectified-flow directory
    with pytest.raises(ConfigError, match=r"'model\.kwargs\.path': .* has no transformer/"):
        stable_diffusion_3(str(tmp_path))
