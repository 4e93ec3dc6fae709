"""A finished `tfft run`'s fine-tuning rebuilt in this process, as the pipeline builds it: for benchmarks that redo
or vary it (`benchmarks.train_overhead`, `benchmarks.weighted_holdout`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunJob", "job_from_run"]


@dataclass(frozen=True)
class RunJob:
    """The run's config and `pipelines.finetune_job.FinetuneJob`, its fresh model (the base's weights), the frozen
    base, and `pipelines.train_build.build_solver`'s solver and ``step(local_batch, generator, seed)``."""

    cfg: Any
    job: Any
    model: torch.nn.Module
    base: torch.nn.Module
    solver: Any
    step: Any


def job_from_run(run: Path, solver: str, **settings: Any) -> RunJob:
    """The fine-tuning of the run in ``run`` (its ``config.yaml``, ``summary.json`` and, for the weighted solver,
    ``bank_base.parquet``) on CPU, with ``settings`` replacing fields of its ``finetune`` section. Exits with a
    message when the run used another solver than ``solver``."""
    from pipelines.bankio import read_bank
    from pipelines.config import load_config
    from pipelines.finetune_job import FinetuneJob
    from pipelines.models import build_model
    from pipelines.pretrain import load_or_pretrain
    from pipelines.stages.preflight import training_steps
    from pipelines.stages.train import _weighted_inputs
    from pipelines.train_build import build_solver
    from tfft.objective import Tilt

    cfg = load_config(run / "config.yaml")
    summary = json.loads((run / "summary.json").read_text())
    if summary["solver"] != solver:
        raise SystemExit(f"{run}: this benchmark is written for the {solver} solver, the run used {summary['solver']}")
    tilt = Tilt.from_dict(summary["objective"])
    weighted = None
    if solver == "weighted":
        weighted = _weighted_inputs(cfg, read_bank(run / "bank_base.parquet"), tilt, lambda _: None)
    ft = dataclasses.replace(cfg.finetune, **settings)
    base_model = load_or_pretrain(cfg, log=lambda _: None)
    job = FinetuneJob(ft, base_model.config, base_model.state_dict, tilt, cfg.reward.target, dict(cfg.reward.kwargs),
                      cfg.seed, steps=ft.steps, sde_steps=training_steps(cfg), weighted=weighted)
    base = build_model(base_model.config, base_model.state_dict).eval().requires_grad_(False)
    model = build_model(base_model.config, base_model.state_dict)
    built, step = build_solver(job, model, base, torch.device("cpu"))
    return RunJob(cfg, job, model, base, built, step)
