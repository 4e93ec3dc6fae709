r"""Image rewards over transformers' CLIP, and a latent-space wrapper that decodes through a diffusers VAE.

Inputs are images x (n, C*H*W) in [-1, 1], flattened row-major as the bank stores them; ``image_shape`` = (C, H, W)
is a kwarg. Weights come from LOCAL directories only (``from_pretrained(path, local_files_only=True)``); a missing
directory or file is a ValueError naming the kwarg and the path, raised when the reward is built, before any weights
are read. Models load lazily on the first evaluation, on CUDA when the process has a GPU (``device`` overrides), so
the reward pickles small (it travels to Ray actors) and loads where it runs.

CLIP's preprocessing in torch, differentiable (:func:`clip_pixels`): [-1, 1] -> [0, 1], resize so the shorter side
is the vision tower's ``image_size`` (bicubic, antialiased), centre crop to a square, normalise by the processor's
mean and std (``preprocessor_config.json`` when the directory has one, else OpenAI CLIP's).

- :class:`ClipScore`: s(x, p) = scale * cos(f_img(x), f_txt(p)), CLIP's projected image and text embeddings of the
  image and its prompt. ``scale`` defaults to 100 (CLIP's trained logit scale; torchmetrics' CLIPScore uses 100 with
  a clip at 0, which we leave out so that the gradient never vanishes). Text embeddings are cached per prompt.
- :class:`AestheticScore`: a linear or small MLP head on the L2-normalised image embedding, as LAION's aesthetic
  predictors (v1: one ``Linear(768, 1)``; v2 "improved": ``layers.{0,2,4,6,7}``, linear layers without activations).
- :class:`LatentDecoded`: r(z) = r_img(VAE.decode(z / scaling_factor + shift_factor)); differentiable end to end
  when the inner reward is.

``cond`` (a list of n prompts) is accepted by every reward here; ``None`` means the ``prompt`` kwarg. Helpers:
:mod:`rewards.image_models` (loading), :mod:`rewards.linear_head` (head files), :mod:`rewards.image_shapes`
(shapes, the VAE's geometry), :mod:`rewards.conditioned` (prompts, batches, gradients).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import Reward, RewardBatch, load_reward
from rewards.conditioned import evaluate_maybe_cond, grad_with_cond, prompts_of, values_batch
from rewards.image_models import encode_prompts, load_clip, load_tokenizer, load_vae
from rewards.image_shapes import check_shape, vae_geometry, with_image_shape
from rewards.linear_head import chain_linear, layer_prefixes, read_state_dict

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ConditionedReward",
    "ClipScore",
    "AestheticScore",
    "LatentDecoded",
    "check_local_dir",
    "clip_pixels",
    "cosine_score",
    "load_linear_head",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_local_dir(path: Any, key: str, required: Sequence[str] = ("config.json",)) -> Path:
    """``path`` as a Path after checking it is a directory with the ``required`` files; ValueError naming
    ``reward.kwargs.<key>`` and the path otherwise."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"'reward.kwargs.{key}' must be a local model directory, got {path!r}")
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise ValueError(f"'reward.kwargs.{key}': {str(root)!r} is not a directory (weights are read from local "
                         "directories only; nothing is downloaded)")
    for name in required:
        if not (root / name).exists():
            raise ValueError(f"'reward.kwargs.{key}': {str(root)!r} has no {name}")
    return root


def clip_pixels(images: Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                std: Sequence[float] = OPENAI_CLIP_STD) -> Tensor:
    """CLIP's pixel values (n, 3, size, size) from images (n, 3, H, W) in [-1, 1], differentiably (module doc)."""
    x = (images + 1.0) / 2.0
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        h, w = new
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def cosine_score(image_embeds: Tensor, text_embeds: Tensor, scale: float = 100.0) -> Tensor:
    """scale * cos(image_embeds[i], text_embeds[i]), (n,) from (n, D) and (n, D)."""
    return scale * F.cosine_similarity(image_embeds, text_embeds, dim=-1, eps=1e-8)


def load_linear_head(path: str | Path, activation: str = "none") -> nn.Sequential:
    """A chain of ``nn.Linear`` layers from a state dict file (``.safetensors``, or ``.pt``/``.pth`` read with
    ``weights_only=True``): keys ``weight``/``bias`` (one layer) or ``<prefix>.<i>.weight``/``.bias``, layers in
    order of i (LAION's ``layers.0`` ... ``layers.7``; dropout indices are simply absent). ``activation``
    (``none``, ``relu``, ``gelu``) goes between consecutive layers; the last layer must output one value."""
    path = Path(path)
    state = read_state_dict(path)
    return chain_linear(state, layer_prefixes(state, path), activation, path)


class ConditionedReward(Reward):
    """A reward whose ``evaluate(x, cond=None)`` takes one condition per sample; ``evaluate_with_grad`` passes it."""

    def evaluate(self, x: Tensor, cond: Sequence[str] | None = None) -> RewardBatch:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x: Tensor, cond: Sequence[str] | None = None) -> RewardBatch:
        return self.evaluate(x, cond=cond)

    def evaluate_with_grad(self, x: Tensor, cond: Sequence[str] | None = None) -> tuple[RewardBatch, Tensor]:
        """Rewards and d r / d x (n, d); rows of invalid samples are zero."""
        if not self.differentiable:
            raise TypeError(f"reward {self.name!r} has no gradients (differentiable = False)")
        return grad_with_cond(self.evaluate, x, cond)


class _ClipReward(ConditionedReward):
    """Shared by the CLIP rewards: path checks, lazy loading, preprocessing, image embeddings."""

    differentiable = True

    def __init__(self, path: str, image_shape: Sequence[int], device: str | None = None) -> None:
        self.path = str(check_local_dir(path, "path"))
        self.image_shape = check_shape(image_shape)
        if self.image_shape[0] != 3:
            raise ValueError(f"'reward.kwargs.image_shape' must have 3 channels for CLIP, got {list(image_shape)}")
        self.device = device
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the loaded models and caches (they reload where the reward runs)."""
        state = dict(self.__dict__)
        state.update({k: None for k in ("_model", "_tokenizer", "_head") if k in state})
        if "_text" in state:
            state["_text"] = {}
        return state

    def _load(self) -> Any:
        if self._model is None:
            model, config = load_clip(self.path, self.device)
            self._mean = tuple(config.get("image_mean", OPENAI_CLIP_MEAN))
            self._std = tuple(config.get("image_std", OPENAI_CLIP_STD))
            self._model = model
        return self._model

    def image_embeds(self, x: Tensor) -> Tensor:
        """CLIP's projected image embeddings (n, D) of flat images x (n, C*H*W) in [-1, 1], in the model's dtype
        (float32) and on its device."""
        model = self._load()
        weight = next(model.parameters())
        images = x.to(device=weight.device, dtype=weight.dtype).reshape(x.shape[0], *self.image_shape)
        pixels = clip_pixels(images, model.config.vision_config.image_size, self._mean, self._std)
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


class ClipScore(_ClipReward):
    """scale * cos(CLIP image embedding of x, CLIP text embedding of its prompt) (module docstring).

    Args:
        path: local CLIP directory (``CLIPModel`` weights and config, and its tokenizer).
        image_shape: (3, H, W) of the flat images.
        prompt: the prompt of every sample when ``cond`` is None.
        scale: multiplies the cosine (default 100, CLIP's logit scale).
        device: where the model runs (default: CUDA when available).
    """

    name = "clip_score"

    def __init__(self, path: str, image_shape: Sequence[int], prompt: str | None = None, scale: float = 100.0,
                 device: str | None = None) -> None:
        super().__init__(path, image_shape, device)
        self.prompt, self.scale = prompt, float(scale)
        self.text_calls = 0
        self._text: dict[str, Tensor] = {}
        self._tokenizer: Any = None

    def value_kwargs(self) -> dict[str, Any]:
        return {"path": self.path, "image_shape": list(self.image_shape), "prompt": self.prompt, "scale": self.scale}

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Projected text embeddings (n, D), each prompt encoded once (one call for all new prompts)."""
        model = self._load()
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.path)
            embeds = encode_prompts(model, self._tokenizer, new)
            self.text_calls += 1
            self._text.update(zip(new, embeds))
        return torch.stack([self._text[p] for p in prompts])

    def evaluate(self, x: Tensor, cond: Sequence[str] | None = None) -> RewardBatch:
        """x (n, 3*H*W) in [-1, 1], cond n prompts (None: ``prompt``) -> n scores."""
        text = self.text_embeds(list(prompts_of(cond, self.prompt, x.shape[0])))
        return values_batch(cosine_score(self.image_embeds(x), text, self.scale), x)


class AestheticScore(_ClipReward):
    """head(f_img(x) / ||f_img(x)||): an aesthetic predictor on normalised CLIP image embeddings (module docstring).

    Args:
        path: local CLIP directory (the predictor's CLIP, e.g. ViT-L/14 for LAION's heads).
        head: ``.safetensors``/``.pt`` file of the head (:func:`load_linear_head`).
        image_shape: (3, H, W) of the flat images.
        activation: between the head's layers (``none`` for LAION's).
        device: where the model runs (default: CUDA when available).
    """

    name = "aesthetic_score"

    def __init__(self, path: str, head: str, image_shape: Sequence[int], activation: str = "none",
                 device: str | None = None) -> None:
        head_path = Path(os.path.expanduser(str(head)))
        if not head_path.is_file():
            raise ValueError(f"'reward.kwargs.head': {str(head_path)!r} is not a file (a .safetensors or .pt head)")
        super().__init__(path, image_shape, device)
        self.head, self.activation = str(head_path), activation
        self._head: Any = None

    def value_kwargs(self) -> dict[str, Any]:
        return {"path": self.path, "head": self.head, "image_shape": list(self.image_shape),
                "activation": self.activation}

    def evaluate(self, x: Tensor, cond: Sequence[str] | None = None) -> RewardBatch:
        """x (n, 3*H*W) in [-1, 1] -> n scores (cond is not used)."""
        embeds = self.image_embeds(x)
        if self._head is None:
            self._head = load_linear_head(self.head, self.activation).to(embeds.device)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return values_batch(self._head(embeds).squeeze(-1), x)


class LatentDecoded(ConditionedReward):
    """r(z) = inner(VAE.decode(z / scaling_factor + shift_factor)), latents z flat (n, C*h*w).

    Args:
        vae_path: local ``AutoencoderKL`` directory, or a pipeline directory with a ``vae/``.
        reward: import path of the image reward (``module:Name``).
        reward_kwargs: its kwargs; ``image_shape`` is filled in from the VAE when the reward takes it and it is
            not given.
        latent_shape: (C, h, w) of the latents (default: the VAE's ``latent_channels`` and ``sample_size`` divided by
            its downsampling factor 2^(blocks - 1)).
        device: where the VAE runs (default: CUDA when available).

    Decoded images are not clipped to [-1, 1] (that would cut the gradient).
    """

    name = "latent_decoded"

    def __init__(self, vae_path: str, reward: str, reward_kwargs: dict[str, Any] | None = None,
                 latent_shape: Sequence[int] | None = None, device: str | None = None) -> None:
        root = Path(os.path.expanduser(str(vae_path))) if isinstance(vae_path, (str, Path)) and str(vae_path) else None
        if root is not None and not (root / "config.json").exists() and (root / "vae" / "config.json").exists():
            root = root / "vae"
        self.vae_path = str(check_local_dir(root if root is not None else vae_path, "vae_path"))
        vae = vae_geometry(Path(self.vae_path), latent_shape)
        self.factor, self.scaling_factor, self.shift_factor = vae.factor, vae.scaling_factor, vae.shift_factor
        self.latent_shape, self.image_shape = vae.latent_shape, vae.image_shape
        self.reward, self.reward_kwargs = reward, with_image_shape(reward, reward_kwargs, self.image_shape)
        self.inner = load_reward(reward, self.reward_kwargs)
        self.differentiable = bool(self.inner.differentiable)
        self.version = f"1+{self.inner.version}"
        self.device = device
        self._vae: Any = None

    def value_kwargs(self) -> dict[str, Any]:
        inner = self.inner.value_kwargs()
        return {"vae_path": self.vae_path, "reward": self.reward, "latent_shape": list(self.latent_shape),
                "reward_kwargs": self.reward_kwargs if inner is None else inner}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_vae"] = None
        return state

    def decode(self, x: Tensor) -> Tensor:
        """Images (n, C*H*W) of latents x (n, C*h*w), differentiable, in the VAE's dtype (float32) and device."""
        if self._vae is None:
            self._vae = load_vae(self.vae_path, self.device)
        weight = next(self._vae.parameters())
        z = x.to(device=weight.device, dtype=weight.dtype).reshape(x.shape[0], *self.latent_shape)
        images = self._vae.decode(z / self.scaling_factor + self.shift_factor).sample
        return images.reshape(x.shape[0], math.prod(self.image_shape))

    def evaluate(self, x: Tensor, cond: Sequence[str] | None = None) -> RewardBatch:
        """x (n, C*h*w) latents -> the inner reward of their decoded images."""
        images = self.decode(x)
        out = evaluate_maybe_cond(self.inner, images, cond)
        return RewardBatch(out.rewards.to(device=x.device, dtype=torch.float64), out.valid.to(x.device), out.errors)
