"""Adjoint-matching fine-tuning steps of a Stable-Diffusion-1.5-sized UNet with LoRA, bf16 (CUDA), or a smoke run.

    python -m benchmarks.sd_lora_step                 # CUDA: SD1.5-size UNet, batch 8 and 16 -> results/sd_lora_step.md
    python -m benchmarks.sd_lora_step --steps 2       # without CUDA: the tiny random pipeline, 2 steps (smoke check)
    python -m benchmarks.sd_lora_step --write         # ... and write the CPU numbers (results/sd_lora_step_cpu.md)
    python -m benchmarks.sd_lora_step --variants      # also the faster memory settings (--help), one table

The model is the adapter of ``pipelines.adapters.stable_diffusion`` (``TextToImageFlow``) around a UNet with LoRA
(peft, rank 16, on the attention projections to_q, to_k, to_v, to_out.0; only the LoRA weights train), under
bf16 autocast on CUDA. The base velocity v_base is the same module with the adapters disabled, so the base costs
no second copy of the UNet. On CUDA the UNet is built from SD 1.5's published ``unet/config.json`` (below) with
random weights: 4 x 64 x 64 latents, cross-attention 768, one fixed random prompt embedding (77 x 768) in place of
the text encoder (its output is cached per prompt and not part of a step). Without CUDA the tiny pipeline of
``pipelines.adapters.tiny`` is written to a temporary directory and loaded by the ``stable_diffusion`` factory.

A step is ``tfft.solvers.AdjointMatchingSolver.step`` (K = 20 SDE steps, the loss on the last 25% of steps plus
``--n-early`` random early ones) on a differentiable stand-in reward on latents, r(x) = -||x||^2 / (2 d), with the
expected-reward objective (every trajectory carries an adjoint: the heaviest case), then backward and an AdamW
step. Reported: median ms/step over ``--steps`` timed steps after 2 warm-up steps, and the peak CUDA memory.
The memory options of ``finetune`` are on by default: gradient checkpointing of the UNet's blocks
(``pipelines.lora.enable_checkpointing``: the base's recomputation runs with the adapters off, so the adjoint's
VJPs are checkpointed too), the loss evaluated and backpropagated ``--loss-chunk`` chosen steps at a time
(``finetune.loss_chunk``, same gradient), and on CUDA the UNet's frozen weights held in bf16 (``--weights``).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).parent / "results"
K = 20
LORA_RANK = 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD15_UNET_CONFIG: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5, unet/config.json
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear"}
PROMPT_TOKENS = 77


def lora_model(flow: nn.Module) -> Any:
    """The flow with LoRA adapters through the pipeline's own `pipelines.lora.wrap_lora` (rank 16 on the attention
    projections; only the adapters train): ``.velocity`` trains, ``.base`` is the same network with the adapters
    switched off (no weight copy; it suspends gradient checkpointing for its call, so the adjoint's
    vector-Jacobian products are the base's)."""
    from pipelines.lora import LoraSettings, wrap_lora

    settings = LoraSettings(LORA_RANK, float(LORA_RANK), 0.0, tuple(LORA_TARGETS))
    return wrap_lora(flow, settings, flat=(flow.sample_shape, None))


def sd15_flow(device: str, weights: str) -> tuple[nn.Module, Any]:
    """The SD1.5-sized TextToImageFlow (random weights, bf16 autocast) and its UNet."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipelines.adapters.stable_diffusion import PromptEncoder, TextToImageFlow

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(getattr(torch, weights))
    embedding = torch.randn(1, PROMPT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"])
    encoder = PromptEncoder(encode_fn=lambda prompts: embedding.expand(len(prompts), -1, -1))
    abar = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod
    flow = TextToImageFlow(unet, encoder, abar, "epsilon", prompt="a benchmark prompt", autocast_dtype=torch.bfloat16)
    return flow.to(device), unet


def tiny_flow(directory: Path) -> tuple[nn.Module, Any]:
    """The tiny random pipeline, written to ``directory`` and loaded by the model factory."""
    from pipelines.adapters.stable_diffusion import stable_diffusion
    from pipelines.adapters.tiny import write_tiny_sd

    flow = stable_diffusion(str(write_tiny_sd(directory / "sd")), prompt="a photo of a cat", dtype="bfloat16")
    return flow, flow.unet


def stand_in_reward(x1: Tensor) -> Any:
    """r(x) = -||x||^2 / (2 d) with its gradient, as the expected-reward pseudo-reward (every row active)."""
    from tfft.pseudo import pseudo_reward_signal

    d = x1.shape[1]
    valid = torch.ones(len(x1), dtype=torch.bool, device=x1.device)
    return pseudo_reward_signal(-x1.pow(2).sum(1) / (2 * d), -x1 / d, valid, eta=None, side="right", alpha=1.0)


def time_forward(model: nn.Module, batch: int, device: str, repeats: int) -> tuple[float, float]:
    """Median ms of one plain forward of the velocity (no gradient) and of one forward + backward, at this batch:
    the floor a step is compared with (a step makes K sampler forwards, the adjoint's VJPs, the loss)."""
    x = torch.randn(batch, model.dim, device=device)
    t = torch.full((batch,), 0.5, device=device)
    out: list[float] = []
    for grad in (False, True):
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            with torch.set_grad_enabled(grad):
                v = model(x, t)
                if grad:
                    v.float().square().mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times.append(1000.0 * (time.perf_counter() - start))
        out.append(statistics.median(times))
    model.zero_grad(set_to_none=True)
    return out[0], out[1]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One measured configuration: the batch and the memory options (``finetune`` keys in brackets)."""

    batch: int
    loss_chunk: int  # finetune.loss_chunk
    adjoint_chunk: int  # finetune.adjoint_chunk
    checkpoint_adjoint: bool  # finetune.checkpoint_adjoint (with gradient checkpointing on)
    channels_last: bool  # the UNet's convolutions in channels-last memory format
    checkpointing: bool = True  # finetune.gradient_checkpointing

    def label(self) -> str:
        parts = [f"loss chunk {self.loss_chunk or 'off'}"]
        if not self.checkpointing:
            parts.append("no checkpointing")
        else:
            parts.append("adjoint checkpointed" if self.checkpoint_adjoint else "adjoint not checkpointed")
        parts.append(f"adjoint chunk {self.adjoint_chunk or 'off'}")
        if self.channels_last:
            parts.append("channels-last")
        return ", ".join(parts)


def time_steps(lora: Any, setting: Setting, steps: int, device: str, n_early: int) -> dict[str, Any]:
    """Median ms per fine-tuning step (solver step, backward, AdamW) and peak CUDA memory for one setting."""
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver

    model, base, batch = lora.velocity, lora.base, setting.batch
    base.checkpoint = setting.checkpoint_adjoint
    config = AdjointMatchingConfig(kl_weight=1.0, steps=K, n_early=n_early, loss_chunk=setting.loss_chunk,
                                   adjoint_chunk=setting.adjoint_chunk)
    solver = AdjointMatchingSolver(model, base, stand_in_reward, config)
    optimiser = torch.optim.AdamW(lora.trainable(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    times: list[float] = []
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2 + steps):
            start = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            result = solver.step(torch.randn(batch, model.dim, generator=gen, device=device), gen)
            result.backward()
            optimiser.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2 or device == "cpu":
                times.append(1000.0 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    graphs = [str(w.message) for w in caught if "CUDA-graph" in str(w.message)]
    forward_ms, forward_backward_ms = time_forward(model, batch, device, repeats=3 if device == "cuda" else 1)
    ms = statistics.median(times)
    return {
        "batch": batch,
        "ms_per_step": ms,
        "peak_gib": peak,
        "forward_ms": forward_ms,
        "forward_backward_ms": forward_backward_ms,
        "step_over_forward": ms / forward_ms,
        "loss_rows": int(result.metrics["batch"]),
        "delta_v": float(result.metrics["delta_v"]),  # > 0 once the LoRA weights moved: the base is not the model
        "graphs": "eager (capture failed)" if graphs else ("CUDA graphs" if device == "cuda" else "eager"),
    }


def settings_of(args: argparse.Namespace, batches: list[int]) -> list[Setting]:
    """The settings to measure: the command line's at each batch; with ``--variants`` also the adjoint's
    activations kept (in chunks of half the batch), that with channels-last convolutions, and no checkpointing
    at all with the loss one chosen step at a time."""
    one = [Setting(b, args.loss_chunk, args.adjoint_chunk, not args.no_checkpoint_adjoint, args.channels_last,
                   not args.no_checkpointing) for b in batches]
    if not args.variants:
        return one
    kept = [Setting(b, args.loss_chunk, max(1, b // 2), False, False) for b in batches]
    fastest = [Setting(b, 1, max(1, b // 2), False, True, checkpointing=False) for b in batches]
    return one + kept + [dataclasses.replace(s, channels_last=True) for s in kept] + fastest


def write(rows: list[dict[str, Any]], device_name: str, trainable: int, args: argparse.Namespace, path: Path) -> None:
    lines = [
        f"# SD-1.5-sized LoRA fine-tuning step (adjoint matching) on {device_name}",
        "",
        f"torch {torch.__version__}; UNet of SD 1.5's config with random weights; LoRA rank {LORA_RANK} on "
        f"{', '.join(LORA_TARGETS)} ({trainable:,} trainable parameters); bf16 autocast; K = {K} SDE steps, loss on "
        f"the last 25% of steps plus {args.n_early} early ones; expected-reward objective on a stand-in latent "
        f"reward (every trajectory carries an adjoint); AdamW step included; median over {args.steps} steps after "
        "2 warm-up steps. Written by `python -m benchmarks.sd_lora_step"
        + (" --variants`" if args.variants else "`") + ", all rows in one process.",
        "",
        f"Gradient checkpointing of the UNet's blocks: on unless a row says otherwise; UNet weights: "
        f"{args.weights if torch.cuda.is_available() else 'float32 (tiny pipeline)'}. 'adjoint (not) checkpointed': "
        "whether the lean adjoint's vector-Jacobian products (the base, adapters off) recompute each block "
        "(`finetune.checkpoint_adjoint`); 'adjoint chunk': trajectories per product (`finetune.adjoint_chunk`); "
        "'loss chunk': chosen steps per loss backward (`finetune.loss_chunk`). 'forward ms' is one plain no-grad "
        "forward of the velocity at the batch (CFG off), 'step / forward' the step time in such forwards (the step "
        "itself makes K sampler forwards, the adjoint's VJPs and the loss's forwards and backwards).",
        "",
        "| batch | setting | ms/step | peak memory (GiB) | forward ms | forward+backward ms | step / forward | loops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['batch']} | {row['setting']} | {row['error']} | | | | | |")
        else:
            lines.append(f"| {row['batch']} | {row['setting']} | {row['ms_per_step']:,.0f} | {row['peak_gib']:.1f} | "
                         f"{row['forward_ms']:,.1f} | {row['forward_backward_ms']:,.1f} | "
                         f"{row['step_over_forward']:.0f} | {row['graphs']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"[sd_lora_step] wrote {path}")


def main(argv: list[str] | None = None) -> None:
    from pipelines.lora import enable_checkpointing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CUDA, 2 on the CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 8 16 on CUDA, 2 on the CPU")
    parser.add_argument("--n-early", type=int, default=3, help="random early steps in the loss")
    parser.add_argument("--loss-chunk", type=int, default=2, help="chosen steps per loss backward (0: all at once)")
    parser.add_argument("--adjoint-chunk", type=int, default=0, help="trajectories per adjoint VJP (0: all at once)")
    parser.add_argument("--no-checkpoint-adjoint", action="store_true",
                        help="the adjoint's VJPs keep their activations (the loss stays checkpointed)")
    parser.add_argument("--channels-last", action="store_true", help="the UNet in channels-last memory format")
    parser.add_argument("--variants", action="store_true",
                        help="also: the adjoint not checkpointed, in chunks of half the batch; and with channels-last")
    parser.add_argument("--weights", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the UNet's frozen weights on CUDA (the LoRA weights stay float32)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation (no recompute)")
    parser.add_argument("--out", default=None, help="results file (default: results/sd_lora_step.md on CUDA)")
    parser.add_argument("--write", action="store_true", help="without CUDA, write results/sd_lora_step_cpu.md")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.steps = args.steps or (5 if cuda else 2)
    batches = args.batches or ([8, 16] if cuda else [2])
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            flow, unet = sd15_flow(device, args.weights)
        else:
            torch.set_num_threads(1)
            flow, unet = tiny_flow(Path(tmp))
        lora = lora_model(flow)
        trainable = sum(p.numel() for p in lora.trainable())
        unet.to(device)
        rows = []
        for setting in settings_of(args, batches):
            if setting.checkpointing:
                enable_checkpointing(lora.velocity)
            else:
                unet.disable_gradient_checkpointing()
            unet.to(memory_format=torch.channels_last if setting.channels_last else torch.contiguous_format)
            try:
                row = time_steps(lora, setting, args.steps, device, args.n_early)
            except torch.cuda.OutOfMemoryError:
                row = {"batch": setting.batch, "error": "out of memory"}
            except Exception as error:  # noqa: BLE001 - record it and go on with the next setting
                row = {"batch": setting.batch, "error": f"{type(error).__name__}: {str(error)[:200]}"}
            row["setting"] = setting.label()
            if cuda:
                torch.cuda.empty_cache()
            print(f"[sd_lora_step] {device} {row}", flush=True)
            rows.append(row)
            if cuda:  # after every setting: a run stopped at a time limit keeps what it measured
                write(rows, torch.cuda.get_device_name(), trainable, args,
                      Path(args.out) if args.out else RESULTS / "sd_lora_step.md")
    if not cuda and args.write:
        write(rows, f"CPU ({platform.processor() or platform.machine()}), tiny pipeline", trainable, args,
              Path(args.out) if args.out else RESULTS / "sd_lora_step_cpu.md")


if __name__ == "__main__":
    main()
