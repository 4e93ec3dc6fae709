"""pipelines.adapters.stable_diffusion on a tiny random SD-class pipeline directory (pipelines.adapters.tiny).

(a) Against diffusers' own StableDiffusionPipeline (DDIM, eta 0, latents out): Euler on the adapter's velocity along
the scheduler's DDIM grid, from the same noise and prompts, gives the same latents to float32 rounding, without
and with classifier-free guidance (DDIM is Euler of the wrapped flow: tfft.diffusion).
(b) Prompt embeddings: one text-encoder call per batch of new prompts, none for known ones.
(c) The module's state and parameters are the UNet's; UNet state dicts load into it and back.
(d) Bad settings are ConfigErrors naming the key and the path, raised before any weights are read.
(e) The model config of the current pipeline (``pipelines.models.build_model``) builds it as a flat velocity.
(f) benchmarks/sd_lora_step.py's setting: v_base is the LoRA UNet with its adapters disabled, also under
    gradient checkpointing.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from pipelines.adapters.stable_diffusion import stable_diffusion  # noqa: E402
from pipelines.adapters.tiny import write_tiny_sd  # noqa: E402
from pipelines.config import ConfigError  # noqa: E402
from pipelines.models import build_model  # noqa: E402
from tfft.diffusion import flow_time  # noqa: E402
from tfft.sampling import sample_ode  # noqa: E402

SHAPE = (4, 8, 8)
PROMPTS = ["a photo of a cat", "red car", "a dog"]
TOLERANCE = 1e-5  # float32 rounding, relative to the largest latent entry (measured: 5e-7 and 4e-7)
TARGET = "pipelines.adapters.stable_diffusion:stable_diffusion"


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_euler_on_the_ddim_grid_is_diffusers_ddim(sd_dir, guidance_scale):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd_dir), local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    noise = torch.randn(len(PROMPTS), *SHAPE, generator=torch.Generator().manual_seed(0))
    want = pipe(PROMPTS, num_inference_steps=20, guidance_scale=guidance_scale, latents=noise.clone(), eta=0.0,
                output_type="latent").images
    flow = stable_diffusion(str(sd_dir), guidance_scale=guidance_scale)
    assert flow.sample_shape == SHAPE
    scheduler = pipe.scheduler  # its grid: leading spacing, steps_offset 1, ends at abar_0 (set_alpha_to_one False)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    end = scheduler.final_alpha_cumprod.to(torch.float64).reshape(1)
    grid = torch.cat([flow_time(abar[scheduler.timesteps.long()]), flow_time(end)])
    start = abar[scheduler.timesteps[0]]
    x0 = noise.double() / (start.sqrt() + (1 - start).sqrt())  # DDIM's state z = (a + s) x at its first level

    def velocity(x, t):
        return flow(x.reshape(-1, *SHAPE), t, PROMPTS).reshape(len(x), -1)

    with torch.no_grad():
        x1 = sample_ode(velocity, x0.float().reshape(len(PROMPTS), -1), grid.float())
    got = x1.double().reshape(noise.shape) * (end.sqrt() + (1 - end).sqrt())
    error = float((got - want).abs().max() / want.abs().max())
    print(f"guidance {guidance_scale}: max relative difference to diffusers' DDIM {error:.1e}")
    assert error < TOLERANCE
    if guidance_scale != 1.0:  # the guided flow is not the unguided one
        plain = stable_diffusion(str(sd_dir))
        x = torch.randn(3, *SHAPE)
        t = torch.full((3,), 0.5)
        assert (flow(x, t, PROMPTS) - plain(x, t, PROMPTS)).abs().max() > 1e-3


def test_prompt_embeddings_are_computed_once_per_prompt(sd_dir):
    flow = stable_diffusion(str(sd_dir), conditions=PROMPTS[:2], prompt="a dog", guidance_scale=2.0)
    calls = []
    flow.prompts.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    assert flow.prompts.calls == 1 and set(flow.prompts.prompts) == {PROMPTS[0], PROMPTS[1], "a dog", ""}
    x, t = torch.randn(4, *SHAPE), torch.rand(4)
    with torch.no_grad():
        flow(x, t, [PROMPTS[0], PROMPTS[1], PROMPTS[0], "a dog"])
        flow(x, t)  # cond None: the prompt kwarg
        assert calls == []
        first = flow(x, t, ["blue tree", PROMPTS[0], "blue tree", "a cat"])
        again = flow(x, t, ["blue tree", PROMPTS[0], "blue tree", "a cat"])
    assert calls == [2] and flow.prompts.calls == 2  # one call for the two new prompts, none after
    assert torch.equal(first, again)
    with torch.no_grad():
        assert torch.equal(flow(x, t), flow(x, t, ["a dog"] * 4))
    with pytest.raises(ValueError, match="one prompt per sample"):
        flow(x, t, PROMPTS)


def test_state_dict_is_the_unets_and_round_trips(sd_dir):
    flow = stable_diffusion(str(sd_dir))
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"), local_files_only=True)
    assert list(flow.state_dict()) == list(unet.state_dict())
    assert sum(p.numel() for p in flow.parameters()) == sum(p.numel() for p in unet.parameters())
    assert not any(p.requires_grad for p in flow.prompts.text_encoder.parameters())
    torch.manual_seed(1)
    other = diffusers.UNet2DConditionModel.from_config(unet.config)  # other random weights
    flow.load_state_dict(other.state_dict())  # strict
    assert all(torch.equal(a, b) for a, b in zip(flow.unet.state_dict().values(), other.state_dict().values()))
    back = diffusers.UNet2DConditionModel.from_config(unet.config)
    back.load_state_dict(flow.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), other.state_dict().values()))


def test_bad_settings_name_the_key_before_loading(sd_dir, tmp_path):
    # a copy of the pipeline whose every weights file is garbage: loading any part would fail with another error
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    weights = [f for f in broken.rglob("*") if f.suffix in (".safetensors", ".bin")]
    assert weights
    for f in weights:
        f.write_bytes(b"not weights")
    with pytest.raises(ConfigError, match=r"'model\.kwargs\.path': .*nowhere.* is not a directory"):
        stable_diffusion(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    for part in ("unet", "tokenizer", "scheduler"):
        (partial / part).mkdir(parents=True)
    (partial / "unet" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'model\.kwargs\.path': .*partial.* has no text_encoder/"):
        stable_diffusion(str(partial))
    with pytest.raises(ConfigError, match=r"'model\.kwargs\.dtype'"):
        stable_diffusion(str(broken), dtype="int8")
    with pytest.raises(ConfigError, match=r"'model\.kwargs\.guidance_scale'"):
        stable_diffusion(str(broken), guidance_scale=-1.0)
    with pytest.raises(Exception) as loading:  # the copy is broken indeed: good settings reach the weights
        stable_diffusion(str(broken))
    assert "dtype" not in str(loading.value) and "guidance_scale" not in str(loading.value)
    with pytest.raises(ConfigError, match=r"'model\.target' .*'model\.kwargs\.path'"):  # through the pipeline's builder
        build_model({"dim": 256, "target": TARGET, "kwargs": {"path": str(tmp_path / "nowhere")},
                     "sample_shape": [4, 8, 8]})


def test_builds_through_the_pipelines_model_config(sd_dir):
    config = {"dim": 256, "target": TARGET, "kwargs": {"path": str(sd_dir), "prompt": "a cat", "dtype": "bfloat16"},
              "sample_shape": list(SHAPE)}
    model = build_model(config)
    flow = stable_diffusion(str(sd_dir), prompt="a cat")  # float32; on the CPU bfloat16 changes nothing
    x, t = torch.randn(2, 256), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(model(x, t), flow(x.reshape(2, *SHAPE), t).reshape(2, 256))
    model(x, t).square().sum().backward()  # the UNet trains
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("checkpointing", ["adapter-aware", "adapter-aware, base not", "diffusers"])
def test_lora_base_is_the_unet_with_adapters_disabled(sd_dir, checkpointing):
    """benchmarks.sd_lora_step's setting (`pipelines.lora.wrap_lora` on the flow, UNet gradient checkpointing on):
    v_base's values and vector-Jacobian products are the plain UNet's, although checkpointing recomputes the
    forward in the backward pass, after the adapters are back on: `enable_checkpointing`'s blocks recompute with
    the adapters as they were, and diffusers' own checkpointing is suspended for the base's call. One
    adjoint-matching step trains only the LoRA weights. With ``base.checkpoint = False``
    (``finetune.checkpoint_adjoint: false``) the base's calls keep their activations: no block is checkpointed."""
    pytest.importorskip("peft")
    from benchmarks.sd_lora_step import lora_model, stand_in_reward
    from pipelines.lora import enable_checkpointing
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver
    from tfft.user_model import FlatVelocity

    plain = FlatVelocity(stable_diffusion(str(sd_dir), prompt="a cat"), SHAPE)
    flow = stable_diffusion(str(sd_dir), prompt="a cat")
    unet = flow.unet
    lora = lora_model(flow)
    if checkpointing == "diffusers":
        unet.enable_gradient_checkpointing()
    else:
        assert enable_checkpointing(lora.velocity) == 1  # the UNet (the text encoder is not part of the module)
    model, base = lora.velocity, lora.base
    base.checkpoint = checkpointing != "adapter-aware, base not"
    # a checkpointed block (diffusers checkpoints each resnet) is called again in the backward pass: count calls
    calls = []
    unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    assert sum(p.numel() for p in lora.trainable()) == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    x, t = torch.randn(3, 256), torch.rand(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # make the adapters matter
        assert torch.allclose(base(x, t), plain(x, t), atol=1e-5)
        assert (model(x, t) - plain(x, t)).abs().max() > 1e-3
    cotangent = torch.randn(3, 256)

    def vjp(velocity):
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(velocity(xg, t), xg, cotangent)[0]

    torch.testing.assert_close(vjp(base), vjp(plain), rtol=1e-4, atol=1e-5)
    calls.clear()
    vjp(base)
    assert len(calls) == (2 if checkpointing == "adapter-aware" else 1)  # diffusers' own function is suspended
    calls.clear()
    vjp(model)
    assert len(calls) == 2  # the model's own calls stay checkpointed
    assert not torch.allclose(vjp(model), vjp(plain), atol=1e-3)  # the adapters change the VJP: the check can fail
    assert unet.is_gradient_checkpointing  # (still) on after the base call
    solver = AdjointMatchingSolver(model, base, stand_in_reward, AdjointMatchingConfig(kl_weight=1.0, steps=4, n_early=1))
    solver.step(torch.randn(2, 256), torch.Generator().manual_seed(0)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None for n, g in grads.items())


def test_finetune_lora_wraps_the_unets_attention_with_prompts(sd_dir):
    """The pipeline's `finetune.lora` (pipelines.lora) on the adapter of a conditional run: adapters on the
    UNet's attention projections only, the adapters-off base equals the plain model exactly, per-row prompts
    reach the UNet, and only adapter weights receive gradients."""
    pytest.importorskip("peft")
    from pipelines.lora import LoraSettings, build_lora_model

    prompts = ["a cat", "a dog"]
    config = {"dim": 256, "target": TARGET, "kwargs": {"path": str(sd_dir)}, "sample_shape": list(SHAPE),
              "conditions": prompts}
    plain = build_model(config)
    settings = LoraSettings.from_dict({"enabled": True, "rank": 4, "alpha": 4, "dropout": 0.0,
                                       "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "merge": False})
    lora = build_lora_model(config, plain.state_dict(), settings)
    assert lora.targets and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
                                for name in lora.targets)
    x, t, cond = torch.randn(4, 256), torch.rand(4), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        for name, p in lora.velocity.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # make the adapters matter
        want = plain(x, t, cond)
        assert torch.equal(lora.base(x, t, cond), want)
        assert (lora.velocity(x, t, cond) - want).abs().max() > 1e-3
        assert not torch.allclose(plain(x, t, torch.tensor([1, 0, 1, 0])), want)  # the prompt matters
    lora.velocity(x, t, cond).square().sum().backward()
    grads = {n for n, p in lora.velocity.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
