"""The image rewards' pretrained models, loaded from local directories only (nothing is downloaded).

- :func:`load_clip`: a ``transformers.CLIPModel`` and its directory's ``preprocessor_config.json``;
  :func:`load_tokenizer` its tokenizer; :func:`encode_prompts` n prompts -> projected text embeddings (n, D).
- :func:`load_vae`: a ``diffusers.AutoencoderKL``.

Models are float32, in eval mode and without gradients of their own, on :func:`torch_device`. transformers and
diffusers are imported only when a model loads, so the rewards stay cheap to import and to pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["torch_device", "load_clip", "load_tokenizer", "encode_prompts", "load_vae"]


def torch_device(device: str | None) -> torch.device:
    """``device``; None or '': CUDA when the process has a GPU, else the CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(path: str, device: str | None) -> tuple[Any, dict[str, Any]]:
    """The ``CLIPModel`` of the local directory ``path`` on :func:`torch_device`, and the directory's processor
    config (``preprocessor_config.json``; {} without one)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True)
    model = model.float().eval().requires_grad_(False).to(torch_device(device))
    processor = Path(path) / "preprocessor_config.json"
    config = json.loads(processor.read_text()) if processor.exists() else {}
    return model, config


def load_tokenizer(path: str) -> Any:
    """The tokenizer of the local directory ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode_prompts(model: Any, tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """CLIP's projected text embeddings (n, D) of n prompts, in one call, without gradients."""
    device = next(model.parameters()).device
    tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return model.text_projection(out.pooler_output)


def load_vae(path: str, device: str | None) -> Any:
    """The ``AutoencoderKL`` of the local directory ``path`` on :func:`torch_device`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    return vae.float().eval().requires_grad_(False).to(torch_device(device))
