r"""A diffusers rectified-flow text-to-image pipeline (Stable Diffusion 3 class: ``SD3Transformer2DModel``, two CLIP
text encoders and an optional T5, ``FlowMatchEulerDiscreteScheduler``) as a tfft flow.

``model.target: pipelines.adapters.stable_diffusion_3:stable_diffusion_3``, ``model.kwargs: {path: DIR, ...}``,
DIR a LOCAL diffusers directory (``transformer/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
``tokenizer_2/``, ``scheduler/``; ``text_encoder_3/`` and ``tokenizer_3/`` when present, else the T5 part of the
prompt embedding is zeros, as in diffusers).

Sign and time convention. diffusers' flow-matching models live on x_sigma = (1 - sigma) x1 + sigma noise
(sigma = 1 noise, sigma = 0 data) and predict u = dx/dsigma = noise - x1; ``FlowMatchEulerDiscreteScheduler.step``
is x' = x + (sigma' - sigma) u, and the network's timestep is sigma * ``num_train_timesteps``. tfft's t = 1 - sigma
is the same interpolant (t = 0 noise, t = 1 data), so

    v(x, t) = dx/dt = -u(x, timestep = (1 - t) * num_train_timesteps),

and tfft's Euler on the grid t_k = 1 - sigma_k is the scheduler's sampler step for step (the shift of the sigma
schedule only places the grid; the network is evaluated at the shifted sigma as given). No change of variables.

Prompts are encoded once each by the pipeline's own ``encode_prompt`` (hidden states and pooled embeddings, cached:
``pipelines.adapters.stable_diffusion.PromptEncoder``); guidance, state dict (the transformer's), frozen text
encoders and ``dtype`` autocast are as in ``pipelines.adapters.stable_diffusion``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.adapters.stable_diffusion import AUTOCAST_DTYPES, PromptEncoder, check_pipeline_dir
from pipelines.config import ConfigError
from tfft.user_model import share_child_state

__all__ = ["RectifiedFlowTransformer", "stable_diffusion_3"]


class RectifiedFlowTransformer(nn.Module):
    """tfft velocity ``forward(x (n, C, h, w), t (n,), cond: list[str] | None) -> (n, C, h, w)`` of an SD3-class
    transformer: v = -u(x, (1 - t) T) (module docstring), with classifier-free guidance v = v_u + w (v_c - v_u)
    from one call on the doubled batch.

    Args:
        transformer: ``transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep).sample``.
        prompts: :class:`PromptEncoder` whose encode function returns (hidden states, pooled embeddings).
        num_train_timesteps: T, the timestep scale of the scheduler (1000).
        guidance_scale, prompt, autocast_dtype, conditions: as ``TextToImageFlow``.

    ``state_dict()`` is the transformer's (same keys).
    """

    def __init__(self, transformer: nn.Module, prompts: PromptEncoder, num_train_timesteps: int = 1000, *,
                 guidance_scale: float = 1.0, prompt: str = "", autocast_dtype: torch.dtype | None = None,
                 conditions: Sequence[str] | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        object.__setattr__(self, "prompts", prompts)  # not a submodule: its weights are not the model's
        self.num_train_timesteps = int(num_train_timesteps)
        self.guidance_scale = float(guidance_scale)
        self.prompt = str(prompt)
        self.autocast_dtype = autocast_dtype
        config = getattr(transformer, "config", None)
        self.sample_shape = None if config is None else (
            int(config.in_channels), int(config.sample_size), int(config.sample_size))
        prompts.add(list(conditions or []) + [self.prompt] + ([""] if self.guidance_scale != 1.0 else []))
        share_child_state(self, "transformer")

    def forward(self, x: Tensor, t: Tensor, cond: Sequence[str] | None = None) -> Tensor:
        n = x.shape[0]
        rows = [self.prompt] * n if cond is None else list(cond)
        if len(rows) != n:
            raise ValueError(f"cond must hold one prompt per sample: {len(rows)} prompts for {n} samples")
        weight_dtype = next(self.transformer.parameters()).dtype
        embeds, pooled = self.prompts(rows, x.device, weight_dtype)
        sample = x.to(weight_dtype)
        timestep = ((1.0 - t.to(torch.float64)) * self.num_train_timesteps).to(weight_dtype)
        guided = self.guidance_scale != 1.0
        if guided:
            embeds_u, pooled_u = self.prompts([""] * n, x.device, weight_dtype)
            sample, timestep = torch.cat([sample, sample]), torch.cat([timestep, timestep])
            embeds, pooled = torch.cat([embeds_u, embeds]), torch.cat([pooled_u, pooled])
        autocast = self.autocast_dtype is not None and x.is_cuda
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=autocast):
            out = self.transformer(hidden_states=sample, encoder_hidden_states=embeds, pooled_projections=pooled,
                                   timestep=timestep).sample
        out = out.to(x.dtype)
        if guided:
            out_u, out_c = out.chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        return -out


def stable_diffusion_3(
    path: str, *, conditions: Sequence[str] | None = None, guidance_scale: float = 1.0, dtype: str = "float32",
    prompt: str = "", max_sequence_length: int = 256,
) -> RectifiedFlowTransformer:
    """``model.target`` factory: the SD3-class directory ``path`` as a :class:`RectifiedFlowTransformer`.

    Args:
        path: local diffusers directory (module docstring).
        conditions: prompts encoded up front.
        guidance_scale: classifier-free guidance weight w (1: none).
        dtype: ``float32``, or ``bfloat16``/``float16``: CUDA autocast of the transformer.
        prompt: the prompt used when ``cond`` is None.
        max_sequence_length: T5 tokens per prompt (diffusers' default 256).
    """
    if dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"'model.kwargs.dtype' must be one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r}")
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
        raise ConfigError(f"'model.kwargs.guidance_scale' must be a number >= 0, got {guidance_scale!r}")
    root = check_pipeline_dir(path, ["transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                     "scheduler"])
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    if "FlowMatch" not in str(scheduler_config.get("_class_name", "")):
        raise ConfigError(f"'model.kwargs.path': {str(root)!r} has the scheduler "
                          f"{scheduler_config.get('_class_name')!r}, not a flow-matching one; a VP diffusion "
                          "pipeline takes pipelines.adapters.stable_diffusion:stable_diffusion")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel.from_pretrained(str(root / "transformer"), local_files_only=True).float()
    extra: dict[str, Any] = {}
    if not (root / "text_encoder_3" / "config.json").exists():
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(root), transformer=transformer, vae=None,
                                                    local_files_only=True, **extra)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if encoder is not None:
            encoder.float().eval().requires_grad_(False)

    def encode(prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    return RectifiedFlowTransformer(
        transformer, PromptEncoder(encode_fn=encode), int(scheduler_config.get("num_train_timesteps", 1000)),
        guidance_scale=float(guidance_scale), prompt=prompt, autocast_dtype=AUTOCAST_DTYPES[dtype],
        conditions=conditions,
    )
