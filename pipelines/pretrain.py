"""``tfft pretrain``: the base model: built, loaded from ``model.checkpoint``, or flow-matching pretrained
and cached by content.

The cache key is a hash of everything that determines the weights (data source, model and pretraining
settings, seed, and the source code of the data source and of a user model's factory with the project modules
they import: `pipelines.source_hash`), so any later run with the same settings and code reuses the file instead
of training again. A model loaded from a checkpoint, or taken as built (``pretrain.steps: 0``), is not cached:
nothing was trained.
With ``data.conditions`` the source is called once per condition (``cond=value``, ``pretrain.n_samples`` each),
the model is conditional and flow matching passes each sample's condition; the key then includes the list.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.conditions import conditions_of
from pipelines.config import ConfigError
from pipelines.models import build_model, checkpoint_identity, load_checkpoint, model_config
from pipelines.schema import Config
from pipelines.source_hash import source_hash
from pipelines.stage_record import BUILT, REUSED, StageRecord
from pipelines.storage import Store
from rewards.base import import_object
from tfft.model import flow_matching_loss

__all__ = ["BaseModel", "pretrain_key", "load_or_pretrain"]


@dataclass(frozen=True)
class BaseModel:
    """A pretrained velocity network: constructor ``config`` plus ``state_dict``; where it is cached; ``stage``:
    what pretraining did in this call (built, or reused from the cache; counts ``steps``), None when nothing is
    pretrained (a checkpoint, or ``pretrain.steps: 0``)."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: str
    cached: bool
    stage: StageRecord | None = None


def pretrain_key(cfg: Config) -> str:
    """Hash of every setting that determines the pretrained weights."""
    payload = {
        "source": cfg.data.source,
        "model": _model_key(cfg),
        "pretrain": {k: v for k, v in asdict(cfg.pretrain).items() if k != "cache_dir"},
        "seed": cfg.seed,
        "torch": torch.__version__.split("+")[0],
    }
    data_code = _code(cfg.data.source)
    if data_code:
        payload["data_code"] = data_code
    if cfg.data.kwargs:  # only when set: caches made before data.kwargs existed keep their key
        payload["data_kwargs"] = dict(cfg.data.kwargs)
    if conditions_of(cfg):  # likewise: unconditional keys are unchanged
        payload["conditions"] = conditions_of(cfg)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model_key(cfg: Config) -> dict[str, Any]:
    """The model's part of the cache key: the built-in MLP's settings exactly as before user models (so older
    caches keep their keys); for a user model its factory, kwargs, shape and checkpoint's content."""
    model = cfg.model
    key: dict[str, Any] = {"hidden": model.hidden, "depth": model.depth, "time_features": model.time_features}
    if model.target:
        key = {"target": model.target, "kwargs": dict(model.kwargs), "code": _code(model.target)}
    if model.sample_shape:
        key["sample_shape"] = list(model.sample_shape)
    if model.checkpoint:
        key["checkpoint"] = checkpoint_identity(model.checkpoint)
    return key


def _code(target: str) -> str:
    """Hash of the source of ``target``'s module ("pkg.module:name") and of the project modules it imports
    (`pipelines.source_hash`): editing a user's model or data file, or a helper module it imports, trains a new
    base model instead of loading weights made by the old code. The project's roots are the folder holding the
    module's top-level package and the folder holding `tfft`; installed packages are not followed. "" when the
    module cannot be found (validation names it)."""
    import tfft

    module = target.partition(":")[0]
    top = importlib.util.find_spec(module.split(".")[0]) if module else None
    if top is None or not top.origin:
        return ""
    origin = Path(top.origin).resolve()
    root = origin.parent.parent if origin.name == "__init__.py" else origin.parent
    return source_hash(module, [root, Path(tfft.__file__).resolve().parent.parent])


def _draw_conditional(cfg: Config, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Pretraining data (N, d) and each row's condition index (N,), n rows per condition; (data, None) without."""
    conditions = conditions_of(cfg)
    if not conditions:
        return _draw_data(cfg, n), None
    parts = [_draw_data(cfg, n, cond=value) for value in conditions]
    if len({p.shape[1] for p in parts}) != 1:
        raise ConfigError(f"data.source {cfg.data.source!r} returned samples of different dimensions for different "
                          f"data.conditions: {[p.shape[1] for p in parts]}")
    return np.concatenate(parts), np.repeat(np.arange(len(parts), dtype=np.int64), n)


_NO_COND = object()


def _draw_data(cfg: Config, n: int, cond: Any = _NO_COND) -> np.ndarray:
    source: Callable[..., Any] = import_object(cfg.data.source)
    extra = {} if cond is _NO_COND else {"cond": cond}
    try:
        data = np.asarray(source(n, cfg.seed, **dict(cfg.data.kwargs), **extra), dtype=np.float32)
    except (TypeError, ValueError) as exc:  # wrong signature, or not numbers
        raise ConfigError(
            f"data.source {cfg.data.source!r} must be called as source(n, seed, **data.kwargs) and return an "
            f"(n, d) array of numbers; calling it failed: {type(exc).__name__}: {exc}"
        ) from exc
    if data.ndim != 2 or data.shape[0] != n:
        raise ConfigError(
            f"data.source {cfg.data.source!r} must return an array of shape (n, d) with n = {n}; got shape {data.shape}"
        )
    if not np.isfinite(data).all():
        raise ConfigError(f"data.source {cfg.data.source!r} returned non-finite values")
    shape = list(cfg.model.sample_shape)
    if shape and math.prod(shape) != data.shape[1]:
        raise ConfigError(
            f"'model.sample_shape' {shape} has {math.prod(shape)} entries but data.source {cfg.data.source!r} "
            f"draws samples of dimension {data.shape[1]}; their product must equal the data dimension"
        )
    return data


def load_or_pretrain(cfg: Config, *, log: Callable[[str], None] = print) -> BaseModel:
    """Return the base model for ``cfg``: loaded from ``model.checkpoint``, as built (``pretrain.steps: 0``),
    or pretrained by flow matching on ``data.source`` and cached (reused when the cache holds it)."""
    started = time.time()
    trains = cfg.pretrain.steps > 0 and not cfg.model.checkpoint
    cache = Store(cfg.pretrain.cache_dir)  # a local directory or an object store (pipelines.storage)
    name = f"base-{pretrain_key(cfg)}.pt"
    if trains and cache.exists(name):
        blob = torch.load(io.BytesIO(cache.read_bytes(name)), map_location="cpu", weights_only=True)
        log(f"[pretrain] reusing cached base model {cache.path_of(name)}")
        stage = StageRecord(REUSED, time.time() - started, {"steps": cfg.pretrain.steps})
        return BaseModel(blob["config"], blob["state_dict"], cache.path_of(name), cached=True, stage=stage)

    # a few draws tell the data dimension, so that the model is built (a bad model.target fails) before the full
    # draw, which then sees the random state these saw: its data are what they would be without them
    entry = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    probe, _ = _draw_conditional(cfg, min(cfg.pretrain.n_samples, 16))
    torch.manual_seed(cfg.seed)
    config = model_config(cfg.model, int(probe.shape[1]), conditions_of(cfg))
    model = _build_base(cfg, config)
    if not trains:
        why = f"loaded {cfg.model.checkpoint}" if cfg.model.checkpoint else "pretrain.steps=0: the model as built"
        if cfg.model.checkpoint and cfg.pretrain.steps:
            why += f" (pretrain.steps={cfg.pretrain.steps} ignored: a checkpoint is never pretrained)"
        log(f"[pretrain] base model {why}")
        return BaseModel(config, _detached(model), cfg.model.checkpoint, cached=False)
    built = torch.get_rng_state()
    torch.set_rng_state(entry[0])
    np.random.set_state(entry[1])
    random.setstate(entry[2])
    drawn, cond = _draw_conditional(cfg, cfg.pretrain.n_samples)
    torch.set_rng_state(built)
    _fit(cfg, model, torch.from_numpy(drawn), log, None if cond is None else torch.from_numpy(cond))
    state = _detached(model)
    buffer = io.BytesIO()
    torch.save({"config": config, "state_dict": state}, buffer)
    cache.write_bytes(name, buffer.getvalue())  # atomic: concurrent runs never read a partial file
    log(f"[pretrain] saved base model to {cache.path_of(name)}")
    stage = StageRecord(BUILT, time.time() - started, {"steps": cfg.pretrain.steps})
    return BaseModel(config, state, cache.path_of(name), cached=False, stage=stage)


def _fit(cfg: Config, model: torch.nn.Module, data: torch.Tensor, log: Callable[[str], None],
         cond: torch.Tensor | None = None) -> None:
    """Flow matching (Adam, cosine decay) on ``data`` (n, d) (conditions ``cond`` (n,)) for ``pretrain.steps``
    steps, in place."""
    steps = cfg.pretrain.steps
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    report_every = max(steps // 10, 1)
    running = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (cfg.pretrain.batch_size,), generator=gen)
        loss = flow_matching_loss(model, data[idx], generator=gen, cond=None if cond is None else cond[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % report_every == 0 or step == steps:
            n = report_every if step % report_every == 0 else step % report_every
            log(f"[pretrain] step {step}/{steps} loss {running / n:.4f} ({time.time() - start:.0f}s)")
            running = 0.0


def _build_base(cfg: Config, config: dict[str, Any]) -> torch.nn.Module:
    """The flat velocity of ``config``, with ``model.checkpoint`` loaded (a user model's wrapper has its network's
    key names); a user model is probed once, so that a wrong output shape fails here, naming the setting, and
    not inside a Ray actor."""
    model = build_model(config)
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
    if "target" in config:
        conditional = bool(config.get("conditions"))
        probe = (torch.zeros(2, dtype=torch.long),) if conditional else ()
        try:
            with torch.no_grad():
                model(torch.zeros(2, config["dim"]), torch.full((2,), 0.5), *probe)
        except Exception as exc:
            shown = f"[{config['conditions'][0]!r}, {config['conditions'][0]!r}]" if conditional else "None"
            raise ConfigError(f"'model.target' {cfg.model.target!r}: forward(x (2, *{config['sample_shape']}), "
                              f"t (2,), {shown}) failed: {type(exc).__name__}: {exc}") from exc
    return model


def _detached(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
