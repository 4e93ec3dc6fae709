"""LoRA through peft (`pipelines.lora`), without Ray: the base path is the base network exactly, the solvers'
base velocity (lean adjoint VJPs, anchored weighted loss) equals a separate frozen copy's and sends no gradient
to the adapters, only adapters train, the saved adapter and merged weights load back, config errors are named."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.lora import (
    LoraSettings,
    build_lora_model,
    count_parameters,
    lora_log_line,
    merged_state,
    read_adapter,
    save_lora_checkpoint,
)
from pipelines.models import build_model, build_network
from tfft.adjoint import lean_adjoint
from tfft.pseudo import pseudo_reward_signal
from tfft.sampling import Trajectory, sample_sde
from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver, WeightedFlowMatchingSolver

MLP = {"dim": 2, "hidden": 16, "depth": 2, "time_features": 4}
USER = {"dim": 2, "target": "user_flow_model:gaussian_flow", "kwargs": {"mean": [0.5, -0.5]}, "sample_shape": [2, 1]}
SETTINGS = LoraSettings(rank=2, alpha=4.0)


def _base_state(config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # the user model's correction starts at zero: give it weights, so the base is generic
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _trained_lora(config: dict, settings: LoraSettings = SETTINGS):
    """A LoRA model whose adapters are not zero (as after training), its frozen base copy and the base state."""
    state = _base_state(config)
    lora = build_lora_model(config, state, settings)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.velocity.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn_like(p))
    frozen = build_model(config, state).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lora, frozen, state


def _adapter_params(lora) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in lora.velocity.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("config", [MLP, USER], ids=["mlp", "user"])
def test_only_adapters_train_and_disabled_adapters_are_the_base(config):
    lora, frozen, _ = _trained_lora(config)
    trainable = {n for n, p in lora.velocity.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(_adapter_params(lora))
    assert lora.targets == (["net.0", "net.2", "net.4"] if "target" not in config else ["correction"])
    x, t = torch.randn(64, 2), torch.rand(64)
    assert torch.equal(lora.base(x, t), frozen(x, t))  # bit for bit
    assert not torch.allclose(lora.velocity(x, t), frozen(x, t), atol=1e-3)  # the adapters act when on
    assert {n for n, p in lora.velocity.named_parameters() if p.requires_grad} == trainable  # restored on exit
    fresh = build_lora_model(config, _base_state(config), SETTINGS)
    assert torch.equal(fresh.velocity(x, t), frozen(x, t))  # B = 0: LoRA starts at the base exactly


def test_log_line_counts():
    lora, _, _ = _trained_lora(MLP)
    trainable, total = count_parameters(lora.velocity)
    # rank 2 on Linear(6, 16), Linear(16, 16), Linear(16, 2): r (in + out) each
    assert trainable == 2 * (6 + 16) + 2 * (16 + 16) + 2 * (16 + 2)
    assert total == trainable + sum(p.numel() for p in build_model(MLP).parameters())
    assert lora_log_line(SETTINGS, 12345, 1234567) == \
        "[finetune] LoRA rank 2: 12,345 trainable of 1,234,567 parameters (1.0%)"


def _trajectory(velocity, n: int = 32, steps: int = 8) -> Trajectory:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        traj = sample_sde(velocity, torch.randn(n, 2, generator=gen), steps, generator=gen, return_trajectory=True)
    assert isinstance(traj, Trajectory)
    return traj


@pytest.mark.parametrize("config", [MLP, USER], ids=["mlp", "user"])
def test_lean_adjoint_vjps_are_the_frozen_base_and_leave_adapters_alone(config):
    lora, frozen, _ = _trained_lora(config)
    traj = _trajectory(lora.velocity)
    terminal = torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(4))
    ours = lean_adjoint(lora.base, traj, terminal)
    reference = lean_adjoint(frozen, traj, terminal)
    torch.testing.assert_close(ours.states, reference.states, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours.base_velocities, reference.base_velocities)
    assert all(p.grad is None for p in lora.velocity.parameters())  # nothing reached any parameter
    # with adapters on, the adjoint would differ: the check above can fail
    assert not torch.allclose(lean_adjoint(lora.velocity, traj, terminal).states, reference.states, atol=1e-4)


def _reward_fn(x1: torch.Tensor):
    r = x1[:, 0].to(torch.float64)
    grad = torch.zeros_like(x1, dtype=torch.float64)
    grad[:, 0] = 1.0
    return pseudo_reward_signal(r, grad, torch.ones(len(r), dtype=torch.bool), eta=0.3, side="right", alpha=0.3)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("config", [MLP, USER], ids=["mlp", "user"])
def test_adjoint_matching_step_equals_a_separate_frozen_base(config, fast):
    """A solver step with the adapters-off base gives the loss and adapter gradients of the same step with a
    separate frozen copy; the base path adds no gradient."""
    lora, frozen, _ = _trained_lora(config)
    am = AdjointMatchingConfig(kl_weight=0.5, steps=8, n_early=3, fast=fast)
    grads, losses = [], []
    for base in (lora.base, frozen):
        solver = AdjointMatchingSolver(lora.velocity, base, _reward_fn, am)
        gen = torch.Generator().manual_seed(5)
        result = solver.step(torch.randn(32, 2, generator=gen), gen)
        lora.velocity.zero_grad(set_to_none=True)
        result.loss.backward()
        losses.append(result.loss.detach())
        grads.append({n: p.grad.clone() for n, p in _adapter_params(lora).items()})
        assert all(p.grad is None for n, p in lora.velocity.named_parameters() if "lora_" not in n)
    assert losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_anchored_weighted_step_equals_a_separate_frozen_base():
    lora, frozen, _ = _trained_lora(MLP)
    bank = torch.randn(200, 2, generator=torch.Generator().manual_seed(6))
    weights = torch.rand(200, generator=torch.Generator().manual_seed(7)).to(torch.float64)
    out = []
    for base in (lora.base, frozen):
        solver = WeightedFlowMatchingSolver(lora.velocity, bank, weights, base=base)
        result = solver.step(64, torch.Generator().manual_seed(8), index_generator=torch.Generator().manual_seed(9))
        lora.velocity.zero_grad(set_to_none=True)
        result.loss.backward()
        out.append((result.loss.detach(), [p.grad.clone() for p in _adapter_params(lora).values()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=0)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [MLP, USER], ids=["mlp", "user"])
def test_saved_adapter_and_merged_weights_load_back(config, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from tfft.model import VelocityMLP
    from tfft.user_model import FlatVelocity

    lora, frozen, state = _trained_lora(config)
    files = save_lora_checkpoint(tmp_path, lora, merge=True)
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors", "merged.safetensors"]
    assert all((tmp_path / f).is_file() for f in files)
    user = "target" in config
    network = build_network(config) if user else VelocityMLP(**config)
    network.load_state_dict(state)
    loaded = PeftModel.from_pretrained(network, str(tmp_path))
    velocity = FlatVelocity(loaded, config["sample_shape"]) if user else loaded
    x, t = torch.randn(64, 2), torch.rand(64)
    with torch.no_grad():
        assert torch.equal(velocity(x, t), lora.velocity(x, t))
        plain = build_network(config) if user else VelocityMLP(**config)
        plain.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))  # the user's module, no peft
        merged = FlatVelocity(plain, config["sample_shape"]) if user else plain
        torch.testing.assert_close(merged(x, t), lora.velocity(x, t), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(x, t), frozen(x, t), atol=1e-3)
    assert set(merged_state(lora.peft)) == set(state)  # the plain network's keys
    assert set(read_adapter(tmp_path)) == {k.replace(".default", "") for k in lora.peft.state_dict() if "lora_" in k}


@pytest.mark.parametrize(("overrides", "message"), [
    (["finetune.lora.rank=0"], "'finetune.lora.rank' must be >= 1"),
    (["finetune.lora.alpha=-1"], "'finetune.lora.alpha' must be > 0"),
    (["finetune.lora.dropout=1.0"], "'finetune.lora.dropout' must be in [0, 1)"),
    (["finetune.lora.target_modules=[net.9]"], "'finetune.lora.target_modules' pattern 'net.9' matches no module"),
    (["finetune.lora.target_modules=[net.1]"], "'finetune.lora.target_modules': peft cannot adapt them"),  # a SiLU
    (["finetune.lora.target_modules=[proj]", "model.target=user_flow_model:gaussian_flow",
      "model.sample_shape=[2,1]"], "'finetune.lora.target_modules' pattern 'proj' matches no module"),
    (["finetune.loss_chunk=-1"], "'finetune.loss_chunk' must be >= 0"),
    (["finetune.adjoint_chunk=-1"], "'finetune.adjoint_chunk' must be >= 0"),
    (["finetune.gradient_checkpointing=true"], "'finetune.gradient_checkpointing' needs a model.target"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["finetune.lora.enabled=true", *overrides])
    assert message in str(info.value)


def test_config_accepts_patterns_and_defaults():
    cfg = load_config(None, ["finetune.lora.enabled=true", "finetune.lora.target_modules=[net.0,net.4]"])
    assert cfg.finetune.lora.rank == 8 and cfg.finetune.lora.alpha is None and not cfg.finetune.lora.merge
    assert not load_config(None, []).finetune.lora.enabled
    lora = build_lora_model(MLP, None, LoraSettings(rank=8, alpha=8.0, target_modules=("net.0", "net.4")))
    assert lora.targets == ["net.0", "net.4"]
    copy.deepcopy(lora.peft)  # merged_state deep-copies the wrapped model


def test_training_workers_build_warm_start_and_checkpoint_only_the_adapter():
    """The worker side (`pipelines.train_build`): the model built from an adapter (threshold refinement's warm
    start) is that fine-tuned model, its checkpoint state is the adapter alone, and it loads back."""
    from pipelines.train_build import build_models as _build_models
    from pipelines.train_build import load_model_state as _load_model_state, model_state as _model_state
    from pipelines.finetune_job import FinetuneJob
    from pipelines.lora import adapter_state
    from pipelines.schema import FinetuneConfig
    from tfft.objective import Tilt

    lora, frozen, state = _trained_lora(MLP)
    job = FinetuneJob(FinetuneConfig(), MLP, state, Tilt(0.0, "right", 0.1, 1.0), "rewards.toy2d:TailReward2D", {},
                      seed=0, steps=1, sde_steps=1, lora=SETTINGS, init_adapter=adapter_state(lora.peft))
    model, base, handle = _build_models(job, torch.device("cpu"))
    x, t = torch.randn(64, 2), torch.rand(64)
    with torch.no_grad():
        assert torch.equal(model(x, t), lora.velocity(x, t))
        assert torch.equal(base(x, t), frozen(x, t))
    saved = _model_state(model, handle)
    assert saved and all(".lora_" in k for k in saved)
    fresh, _, fresh_handle = _build_models(dataclasses.replace(job, init_adapter=None), torch.device("cpu"))
    _load_model_state(fresh, fresh_handle, saved)
    with torch.no_grad():
        assert torch.equal(fresh(x, t), lora.velocity(x, t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_adjoint_step_on_cuda_equals_a_separate_frozen_base():
    """On CUDA the fast path captures the sampler and the adjoint as CUDA graphs: the adapters-off base must be
    captured with its adapters off."""
    lora, frozen, _ = _trained_lora(MLP)
    lora.velocity.cuda()
    frozen.cuda()
    am = AdjointMatchingConfig(kl_weight=0.5, steps=8, n_early=3, fast=True)
    out = []
    for base in (lora.base, frozen):
        solver = AdjointMatchingSolver(lora.velocity, base, _reward_fn, am)
        for seed in (5, 6):  # the second step replays the captured graphs
            gen = torch.Generator(device="cuda").manual_seed(seed)
            result = solver.step(torch.randn(32, 2, generator=gen, device="cuda"), gen)
            lora.velocity.zero_grad(set_to_none=True)
            result.loss.backward()
        out.append((result.loss.detach(), [p.grad.clone() for p in _adapter_params(lora).values()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=0)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", [MLP, USER], ids=["mlp", "user"])
def test_training_steps_change_only_adapters(config):
    """A few optimiser steps as the training loop takes them (Adam on the parameters that require gradients,
    clipping over all): every non-adapter tensor stays the base's exactly, and the adapters off are the base."""
    state = _base_state(config)
    lora = build_lora_model(config, state, SETTINGS)
    opt = torch.optim.Adam([p for p in lora.velocity.parameters() if p.requires_grad], lr=1e-2)
    solver = AdjointMatchingSolver(lora.velocity, lora.base, _reward_fn,
                                   AdjointMatchingConfig(kl_weight=0.5, steps=8, n_early=3))
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        result = solver.step(torch.randn(64, 2, generator=gen), gen)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.velocity.parameters(), 100.0)
        opt.step()
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in lora.peft.state_dict().items() if ".lora_" not in k}
    assert set(after) == set(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert any(p.abs().sum() > 0 for n, p in lora.velocity.named_parameters() if "lora_B" in n)  # B moved
    x, t = torch.randn(64, 2), torch.rand(64)
    with torch.no_grad():
        assert torch.equal(lora.base(x, t), build_model(config, state)(x, t))
        assert not torch.allclose(lora.velocity(x, t), lora.base(x, t), atol=1e-5)


def test_gradient_checkpointing_needs_a_module_that_supports_it():
    from pipelines.lora import enable_checkpointing

    with pytest.raises(ConfigError, match="'finetune.gradient_checkpointing' is on, but the model has no module"):
        enable_checkpointing(build_model(USER))


def test_fresh_adapters_do_not_depend_on_the_global_random_state():
    state = _base_state(MLP)
    torch.manual_seed(1)
    first = build_lora_model(MLP, state, SETTINGS)
    torch.manual_seed(2)
    second = build_lora_model(MLP, state, SETTINGS)
    a = {n: p for n, p in first.velocity.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in second.velocity.named_parameters() if "lora_A" in n}
    assert a and all(torch.equal(a[n], b[n]) for n in a) and any(bool(p.abs().sum() > 0) for p in a.values())


def test_a_factory_that_cannot_build_on_the_meta_device_is_checked_on_the_cpu():
    """conformer_velocity computes its rates' bound with .item(): the check builds it for real and accepts its
    rate head as a target; a factory that fails for real still names model.target."""
    from pipelines.lora import check_lora

    model = {"dim": 27, "target": "rewards.molecule.model:conformer_velocity", "sample_shape": [27],
             "kwargs": {"smiles": "CCO", "scale": 0.3, "hidden": 8, "depth": 1}}
    lora = dataclasses.replace(load_config(None, ["finetune.lora.enabled=true"]).finetune.lora,
                               rank=2, target_modules=["rate_head"])
    check_lora(lora, model)
    with pytest.raises(ConfigError, match="model.target"):
        check_lora(lora, {**model, "kwargs": {**model["kwargs"], "correction": "spring"}})
