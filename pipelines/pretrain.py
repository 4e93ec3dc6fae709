"""``tfft pretrain``: flow-matching pretraining of the base model, cached by content.

The cache key is a hash of everything that determines the weights (data source, model and pretraining
settings, seed), so any later run with the same settings reuses the file instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.config import ConfigError
from pipelines.schema import Config
from rewards.base import import_object
from tfft.model import VelocityMLP, flow_matching_loss

__all__ = ["BaseModel", "pretrain_key", "load_or_pretrain", "build_model"]


@dataclass(frozen=True)
class BaseModel:
    """A pretrained velocity network: constructor ``config`` plus ``state_dict``; where it is cached."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: str
    cached: bool


def build_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> VelocityMLP:
    """Rebuild a VelocityMLP from its constructor config and (optionally) weights."""
    model = VelocityMLP(**config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def pretrain_key(cfg: Config) -> str:
    """Hash of every setting that determines the pretrained weights."""
    payload = {
        "source": cfg.data.source,
        "model": asdict(cfg.model),
        "pretrain": {k: v for k, v in asdict(cfg.pretrain).items() if k != "cache_dir"},
        "seed": cfg.seed,
        "torch": torch.__version__.split("+")[0],
    }
    if cfg.data.kwargs:  # only when set: caches made before data.kwargs existed keep their key
        payload["data_kwargs"] = dict(cfg.data.kwargs)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _draw_data(cfg: Config) -> np.ndarray:
    source: Callable[[int, int], Any] = import_object(cfg.data.source)
    try:
        data = np.asarray(source(cfg.pretrain.n_samples, cfg.seed, **dict(cfg.data.kwargs)), dtype=np.float32)
    except (TypeError, ValueError) as exc:  # wrong signature, or not numbers
        raise ConfigError(
            f"data.source {cfg.data.source!r} must be called as source(n, seed, **data.kwargs) and return an "
            f"(n, d) array of numbers; calling it failed: {type(exc).__name__}: {exc}"
        ) from exc
    if data.ndim != 2 or data.shape[0] != cfg.pretrain.n_samples:
        raise ConfigError(
            f"data.source {cfg.data.source!r} must return an array of shape (n, d) with n = "
            f"{cfg.pretrain.n_samples}; got shape {data.shape}"
        )
    if not np.isfinite(data).all():
        raise ConfigError(f"data.source {cfg.data.source!r} returned non-finite values")
    return data


def load_or_pretrain(cfg: Config, *, log: Callable[[str], None] = print) -> BaseModel:
    """Return the cached base model for ``cfg``, training and caching it first if needed."""
    cache_dir = Path(os.path.expanduser(cfg.pretrain.cache_dir))
    path = cache_dir / f"base-{pretrain_key(cfg)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        log(f"[pretrain] reusing cached base model {path}")
        return BaseModel(blob["config"], blob["state_dict"], str(path), cached=True)

    data = torch.from_numpy(_draw_data(cfg))
    torch.manual_seed(cfg.seed)
    config = {"dim": int(data.shape[1]), **asdict(cfg.model)}
    model = build_model(config)
    steps = cfg.pretrain.steps
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    report_every = max(steps // 10, 1)
    running = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (cfg.pretrain.batch_size,), generator=gen)
        loss = flow_matching_loss(model, data[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % report_every == 0 or step == steps:
            n = report_every if step % report_every == 0 else step % report_every
            log(f"[pretrain] step {step}/{steps} loss {running / n:.4f} ({time.time() - start:.0f}s)")
            running = 0.0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"config": config, "state_dict": state}, tmp)
    os.replace(tmp, path)  # atomic: concurrent runs never read a partial file
    log(f"[pretrain] saved base model to {path}")
    return BaseModel(config, state, str(path), cached=False)
