r"""A diffusers text-to-image pipeline (Stable-Diffusion class: UNet, CLIP text encoder, VP schedule) as a tfft flow.

``model.target: pipelines.adapters.stable_diffusion:stable_diffusion`` with ``model.kwargs: {path: DIR, ...}``.
DIR is a LOCAL directory in diffusers' layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; a
``vae/`` is needed only to decode, by ``rewards.image:LatentDecoded``); nothing is ever downloaded.

The returned module works on latents, ``forward(x (n, C, h, w), t (n,), cond) -> (n, C, h, w)``, with
(C, h, w) = (``unet.config.in_channels``, ``sample_size``, ``sample_size``): (4, 64, 64) for SD 1.5, i.e.
``model.sample_shape: [4, 64, 64]``. t is tfft's flow time (t = 0 noise, t = 1 data, DESIGN.md section 2); the
noise (eps or v) prediction becomes the flow's velocity by ``tfft.diffusion.VPDiffusionFlow``, so Euler on the
scheduler's own time grid is DDIM (eta = 0).

Conditions. ``cond`` is a list of n prompts; ``None`` means ``prompt`` (a kwarg, default ``""``) for every row, so
a single-prompt run needs no condition axis. Each prompt's text-encoder output (n_tokens, cross_dim) is computed
once, without gradients, and cached (:class:`PromptEncoder`; ``conditions`` are encoded when the module is built).

Classifier-free guidance, ``guidance_scale`` w != 1: one UNet call on the batch doubled, rows [uncond; cond] with
the empty prompt's embedding for the unconditional half, and

    v = v_u + w (v_c - v_u).

The velocity is affine in the network's output at fixed (x, t) (``VPDiffusionFlow``: v = (x - eps)/t or
(x1_hat - x)/(1 - t), x1_hat affine in eps), so guiding the output, as diffusers does, is guiding v.

Training. The UNet is the only trainable part: the text encoder is frozen (``requires_grad_(False)``) and lives
outside the module tree, on the CPU, so ``state_dict()`` holds exactly the UNet's keys (``unet/`` weights load
as a ``model.checkpoint``) and ``.to(device)`` moves only the UNet (the cached embeddings follow on use).
``dtype: bfloat16`` runs the UNet under CUDA autocast (weights stay float32; nothing changes on the CPU).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.adapters.prompts import PromptEncoder
from pipelines.config import ConfigError
from tfft.diffusion import VPDiffusionFlow
from tfft.user_model import share_child_state

__all__ = [
    "AUTOCAST_DTYPES",
    "PromptEncoder",
    "GuidedUNet",
    "TextToImageFlow",
    "check_pipeline_dir",
    "latent_noise",
    "latent_shape",
    "stable_diffusion",
]

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPONENTS = {  # sub-directory: the file that must be there ("": the directory itself; default config.json)
    "tokenizer": "",
    "tokenizer_2": "",
    "tokenizer_3": "",
    "scheduler": "scheduler_config.json",
}


def check_pipeline_dir(path: Any, components: Sequence[str], key: str = "model.kwargs.path") -> Path:
    """``path`` as a Path after checking that it is a directory holding each component (and its config file);
    otherwise a ConfigError naming ``key`` and the path. Reads no weights."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"'{key}' must be a local diffusers pipeline directory, got {path!r}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"'{key}': {str(root)!r} is not a directory (a local diffusers pipeline directory with "
                          f"{', '.join(c + '/' for c in components)}; nothing is downloaded)")
    for component in components:
        sub = root / component
        name = _COMPONENTS.get(component, "config.json")
        needed = sub / name if name else sub
        if not needed.exists():
            raise ConfigError(f"'{key}': {str(root)!r} has no {component}/ component ({str(needed)!r} is missing)")
    return root


def latent_shape(unet_config: Any) -> tuple[int, int, int]:
    """(C, h, w) of the UNet's latents from its config: ``in_channels`` and ``sample_size`` (int or pair)."""
    size = unet_config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet_config.in_channels), int(h), int(w)


@dataclass(frozen=True)
class TextCondition:
    """What :class:`GuidedUNet` receives as ``cond``: conditional embeddings (n, L, D), and the unconditional
    (empty-prompt) embedding (1, L, D) or None when there is no guidance."""

    embeds: Tensor
    uncond: Tensor | None


class GuidedUNet(nn.Module):
    """``UNet2DConditionModel`` as ``network(z, timestep, cond: TextCondition) -> output`` for ``VPDiffusionFlow``,
    with classifier-free guidance out = o_u + w (o_c - o_u) from one call on the doubled batch.

    Inputs are cast to the UNet's parameter dtype and the output back to z's dtype; under ``autocast_dtype``
    (CUDA only) the UNet runs in autocast. The state dict is the UNet's.
    """

    def __init__(self, unet: nn.Module, guidance_scale: float = 1.0, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.autocast_dtype = autocast_dtype
        share_child_state(self, "unet")

    def forward(self, z: Tensor, timestep: Tensor, cond: TextCondition) -> Tensor:
        weight_dtype = next(self.unet.parameters()).dtype
        n = z.shape[0]
        sample, steps, embeds = z.to(weight_dtype), timestep.to(weight_dtype), cond.embeds
        guided = cond.uncond is not None and self.guidance_scale != 1.0
        if guided:
            sample, steps = torch.cat([sample, sample]), torch.cat([steps, steps])
            embeds = torch.cat([cond.uncond.expand(n, *cond.uncond.shape[1:]), embeds])
        embeds = embeds.to(weight_dtype)
        autocast = self.autocast_dtype is not None and z.is_cuda
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=autocast):
            out = self.unet(sample, steps, encoder_hidden_states=embeds).sample
        out = out.to(z.dtype)
        if guided:
            out_u, out_c = out.chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        return out


class TextToImageFlow(nn.Module):
    """tfft velocity ``forward(x (n, C, h, w), t (n,), cond: list[str] | None) -> (n, C, h, w)`` of a
    text-conditioned VP diffusion UNet (module docstring).

    Args:
        unet: ``UNet2DConditionModel``-like (``unet(z, timestep, encoder_hidden_states=...).sample``).
        prompts: the :class:`PromptEncoder` (kept outside the module tree: no state, no device moves).
        alphas_cumprod: the scheduler's abar, (T,).
        prediction_type: ``epsilon`` or ``v_prediction``.
        guidance_scale: w (1: no guidance, one UNet call).
        prompt: the prompt of rows when ``cond`` is None.
        autocast_dtype: CUDA autocast dtype of the UNet, or None.
        conditions: prompts to encode now.

    ``state_dict()`` is the UNet's (same keys).
    """

    def __init__(self, unet: nn.Module, prompts: PromptEncoder, alphas_cumprod: Tensor,
                 prediction_type: str = "epsilon", *, guidance_scale: float = 1.0, prompt: str = "",
                 autocast_dtype: torch.dtype | None = None, conditions: Sequence[str] | None = None) -> None:
        super().__init__()
        self.flow = VPDiffusionFlow(GuidedUNet(unet, guidance_scale, autocast_dtype), alphas_cumprod, prediction_type)
        object.__setattr__(self, "prompts", prompts)  # not a submodule: its weights are not the model's
        self.prompt = str(prompt)
        self.guidance_scale = float(guidance_scale)
        self.sample_shape = latent_shape(unet.config) if hasattr(unet, "config") else None
        prompts.add(list(conditions or []) + [self.prompt] + ([""] if self.guidance_scale != 1.0 else []))
        share_child_state(self, "flow")

    @property
    def unet(self) -> nn.Module:
        """The wrapped UNet (the trainable part)."""
        return self.flow.network.unet

    def forward(self, x: Tensor, t: Tensor, cond: Sequence[str] | None = None) -> Tensor:
        n = x.shape[0]
        rows = [self.prompt] * n if cond is None else list(cond)
        if len(rows) != n:
            raise ValueError(f"cond must hold one prompt per sample: {len(rows)} prompts for {n} samples")
        dtype = next(self.unet.parameters()).dtype
        embeds = self.prompts(rows, x.device, dtype)
        uncond = self.prompts([""], x.device, dtype) if self.guidance_scale != 1.0 else None
        return self.flow(x, t, TextCondition(embeds, uncond))


def latent_noise(n: int, seed: int, shape: Sequence[int] = (4, 64, 64), cond: Any = None) -> Any:
    """``data.source`` for a run whose base model is loaded as built (``pretrain.steps: 0``): N(0, I) latents
    (n, prod(shape)), float32. The pipeline draws a few to learn the data dimension; nothing is trained on them,
    so the prompt (``cond``, with ``data.conditions``) changes nothing."""
    import numpy as np

    dim = int(np.prod([int(s) for s in shape]))
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def _scheduler_schedule(root: Path) -> tuple[Tensor, str]:
    """abar (T,) and the prediction type of the pipeline's VP scheduler (its config read by DDPMScheduler)."""
    from diffusers import DDPMScheduler

    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    name = str(config.get("_class_name", ""))
    if "FlowMatch" in name:
        raise ConfigError(f"'model.kwargs.path': {str(root)!r} has a flow-matching scheduler ({name}); this adapter "
                          "takes VP diffusion pipelines (eps or v prediction)")
    prediction_type = config.get("prediction_type", "epsilon")
    scheduler = DDPMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return scheduler.alphas_cumprod.to(torch.float64), prediction_type


def stable_diffusion(path: str, *, conditions: Sequence[str] | None = None, guidance_scale: float = 1.0,
                     dtype: str = "float32", prompt: str = "") -> TextToImageFlow:
    """``model.target`` factory: the pipeline directory ``path`` as a :class:`TextToImageFlow` (module docstring).

    Args:
        path: local diffusers pipeline directory (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
        conditions: prompts encoded up front (the pipeline passes the run's prompts).
        guidance_scale: classifier-free guidance weight w (1: none).
        dtype: ``float32``, or ``bfloat16``/``float16``: CUDA autocast of the UNet.
        prompt: the prompt used when ``cond`` is None.
    """
    if dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"'model.kwargs.dtype' must be one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r}")
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
        raise ConfigError(f"'model.kwargs.guidance_scale' must be a number >= 0, got {guidance_scale!r}")
    if conditions is not None and (isinstance(conditions, str) or not all(isinstance(c, str) for c in conditions)):
        raise ConfigError(f"'conditions' must be a list of prompts (strings), got {conditions!r}")
    root = check_pipeline_dir(path, ["unet", "text_encoder", "tokenizer", "scheduler"])
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    alphas_cumprod, prediction_type = _scheduler_schedule(root)
    unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True)
    encoder = PromptEncoder(tokenizer, text_encoder)
    return TextToImageFlow(unet.float(), encoder, alphas_cumprod, prediction_type, guidance_scale=float(guidance_scale),
                           prompt=prompt, autocast_dtype=AUTOCAST_DTYPES[dtype], conditions=conditions)
