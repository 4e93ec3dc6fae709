"""What the in-process molecule benchmarks share (no Ray): the base model and reward of
``tune_configs/molecule_right.yaml``, scoring in chunks, and writing a result as ``<stem>.json`` + ``<stem>.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["ROOT", "RESULTS", "molecule_setup", "score", "write_results"]


def molecule_setup(seed: int, overrides: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """(config, base model, reward) of the right-tail molecule config at ``seed`` with ``overrides`` (``key=value``):
    the cached base model (pretrained first if absent) and the GFN1-xTB reward, in this process."""
    from pipelines.config import load_config
    from pipelines.pretrain import load_or_pretrain
    from rewards.base import load_reward

    cfg = load_config(ROOT / "tune_configs" / "molecule_right.yaml", [f"seed={seed}", *overrides])
    base = load_or_pretrain(cfg, log=lambda line: print(line, flush=True))
    return cfg, base, load_reward(cfg.reward.target, dict(cfg.reward.kwargs))


def score(reward: Any, x: torch.Tensor, chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(rewards (n,), valid (n,)) of samples x (n, d), ``chunk`` rows per reward call."""
    r, v = [], []
    for i in range(0, len(x), chunk):
        out = reward.evaluate(x[i : i + chunk].double())
        r.append(out.rewards.numpy())
        v.append(out.valid.numpy().astype(bool))
    return np.concatenate(r), np.concatenate(v)


def write_results(stem: str | Path, result: dict[str, Any], table: str) -> None:
    """``<stem>.json`` (the result) and ``<stem>.md`` (the table), and the table on stdout."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)
