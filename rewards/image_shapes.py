"""Shapes of the image rewards' flat inputs: ``[C, H, W]`` kwargs checked, a VAE's latent and image shapes.

Images and latents travel flat, x (n, C*H*W) row-major. :func:`vae_geometry` reads a diffusers VAE's
``config.json``: downsampling factor f = 2^(len(block_out_channels) - 1), scaling and shift factors, latents
(latent_channels, sample_size / f, sample_size / f) unless given, images (out_channels, h * f, w * f).
:func:`with_image_shape` fills ``image_shape`` into the kwargs of an inner image reward that takes it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.base import import_object

__all__ = ["check_shape", "VaeGeometry", "vae_geometry", "with_image_shape"]


def check_shape(image_shape: Any, key: str = "image_shape") -> tuple[int, int, int]:
    """``image_shape`` as (C, H, W) of positive ints; ValueError naming ``reward.kwargs.<key>`` otherwise."""
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"'reward.kwargs.{key}' must be [C, H, W] (positive ints), got {image_shape!r}")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class VaeGeometry:
    """A VAE's downsampling ``factor``, ``scaling_factor``, ``shift_factor``, ``latent_shape`` (C, h, w) and the
    ``image_shape`` (C', h * factor, w * factor) it decodes latents to."""

    factor: int
    scaling_factor: float
    shift_factor: float
    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]


def vae_geometry(vae_dir: Path, latent_shape: Any = None) -> VaeGeometry:
    """The geometry of the VAE in ``vae_dir`` (its ``config.json``); ``latent_shape`` None: from the config, else
    checked (ValueError naming ``reward.kwargs.latent_shape``)."""
    config = json.loads((vae_dir / "config.json").read_text())
    factor = 2 ** (len(config.get("block_out_channels", [0])) - 1)
    scaling_factor = float(config.get("scaling_factor", 0.18215))
    shift = config.get("shift_factor")
    shift_factor = float(shift) if shift is not None else 0.0
    if latent_shape is None:
        size = config.get("sample_size", 512)
        size = size if isinstance(size, int) else size[0]
        latent_shape = [int(config.get("latent_channels", 4)), size // factor, size // factor]
    latent = check_shape(latent_shape, "latent_shape")
    _, h, w = latent
    image = (int(config.get("out_channels", 3)), h * factor, w * factor)
    return VaeGeometry(factor, scaling_factor, shift_factor, latent, image)


def with_image_shape(reward: str, reward_kwargs: dict[str, Any] | None, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """A copy of ``reward_kwargs`` with ``image_shape`` filled in when ``reward`` (``module:Name``) is a class that
    takes it and it is not given; ValueError naming ``reward.kwargs.reward`` when it does not import."""
    kwargs = dict(reward_kwargs or {})
    try:
        target = import_object(reward)
    except ValueError as exc:
        raise ValueError(f"'reward.kwargs.reward': {exc}") from None
    if inspect.isclass(target) and "image_shape" in inspect.signature(target).parameters:
        kwargs.setdefault("image_shape", list(image_shape))
    return kwargs
