"""Prompt embeddings of a text-to-image model, computed once per prompt and cached (`PromptEncoder`).

Used by the diffusers adapters (`pipelines.adapters.stable_diffusion`, `pipelines.adapters.stable_diffusion_3`):
the text encoder is frozen and runs once per batch of new prompts; a forward pass of the flow then only looks
its prompts' embeddings up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """Prompt -> text-encoder hidden states (n_tokens, cross_dim), computed once per prompt, without gradients.

    Tokenised as diffusers' Stable Diffusion pipeline does (padding to ``tokenizer.model_max_length``,
    truncation, no attention mask) and encoded by ``text_encoder(ids)[0]`` (the last hidden state). ``calls``
    counts text-encoder calls (one per batch of new prompts). The cache holds the CPU tensors and, per
    (device, dtype) in use, a copy there, so a forward pass makes no host-to-device copy once a prompt is known.

    Args:
        tokenizer: a transformers tokenizer.
        text_encoder: ``CLIPTextModel``-like; frozen and kept on the CPU here.
        encode_fn: instead of the two above, any ``fn(prompts: list[str]) -> Tensor (p, ...)`` or a tuple of such
            tensors (SD3: hidden states and pooled embeddings); calling the encoder then returns the same structure,
            one row per prompt (``calls`` counts its calls).
    """

    def __init__(self, tokenizer: Any = None, text_encoder: nn.Module | None = None,
                 encode_fn: Callable[[list[str]], Tensor] | None = None) -> None:
        if encode_fn is None and (tokenizer is None or text_encoder is None):
            raise ValueError("PromptEncoder needs a tokenizer and a text encoder, or encode_fn")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        self.encode_fn = encode_fn
        self.calls = 0
        self._cpu: dict[str, Tensor] = {}
        self._on: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Any:
        self.calls += 1
        if self.encode_fn is not None:
            out = self.encode_fn(prompts)
            if isinstance(out, tuple):
                return tuple(o.detach().float().cpu() for o in out)
            return out.detach().float().cpu()
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0].float()

    def add(self, prompts: Sequence[str]) -> None:
        """Encode the prompts not yet cached, in one text-encoder call."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._cpu))
        for name in new:
            if not isinstance(name, str):
                raise TypeError(f"prompts must be strings, got {type(name).__name__}")
        if new:
            out = self._encode(new)
            for i, name in enumerate(new):
                self._cpu[name] = tuple(o[i] for o in out) if isinstance(out, tuple) else out[i]

    def __call__(self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype) -> Any:
        """(n, n_tokens, cross_dim) on ``device``/``dtype`` for n prompts (a broadcast view when all are equal), or
        a tuple of such batches when ``encode_fn`` returns tuples."""
        self.add(prompts)
        cache = self._on.setdefault((torch.device(device), dtype), {})
        for name in dict.fromkeys(prompts):
            if name not in cache:
                value = self._cpu[name]
                cache[name] = (tuple(v.to(device=device, dtype=dtype) for v in value) if isinstance(value, tuple)
                               else value.to(device=device, dtype=dtype))
        rows = [cache[name] for name in prompts]
        if isinstance(rows[0], tuple):
            return tuple(_rows([row[i] for row in rows], len(set(prompts)) == 1) for i in range(len(rows[0])))
        return _rows(rows, len(set(prompts)) == 1)

    @property
    def prompts(self) -> list[str]:
        """The cached prompts."""
        return list(self._cpu)

    def __getstate__(self) -> dict[str, Any]:  # copies keep the CPU cache only
        state = dict(self.__dict__)
        state["_on"] = {}
        return state


def _rows(rows: list[Tensor], same: bool) -> Tensor:
    """One batch of per-prompt tensors: a broadcast view of the first when all prompts are the same."""
    return rows[0].unsqueeze(0).expand(len(rows), *rows[0].shape) if same else torch.stack(rows)
