"""The fine-tuning run, from the driver: a Ray Train ``TorchTrainer`` worker group (DDP; gloo on CPU), or with
``finetune.backend: local`` the same loop in the calling process (one worker, no Ray Train; for short runs).

:func:`run_finetune` hands its `pipelines.finetune_job.FinetuneJob` unchanged to every worker (the objective
travels in it as the `tfft.objective.Tilt` itself), fits, and returns the state the guard keeps
(`pipelines.guard`). The loop itself is `pipelines.finetune.run_loop`. A restarted worker group continues from the
latest checkpoint, and rerunning with the same ``(storage_path, name)`` and backend resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipelines.config import ConfigError
from pipelines.finetune import run_loop, train_loop
from pipelines.finetune_job import FinetuneJob
from pipelines.lora_io import driver_lora, lora_outcome
from pipelines.schema_finetune import FinetuneConfig

__all__ = ["FinetuneResult", "run_finetune"]

State = dict[str, torch.Tensor]
Fitted = tuple[dict[str, Any], list[dict[str, Any]], str]  # (the last checkpoint's state.pt, metrics, its path)


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned weights, metrics reported by rank 0 (``history``: on the Ray backend the reports that came
    with the checkpoints Ray Train kept, its ``metrics_dataframe``; on the local backend every report), the solver
    used, and which state the guard kept (``kept``: "best" | "last") with the reason and, if it stopped training
    early, why. The full metric series is in MLflow.

    With LoRA, ``state_dict`` is the merged network (keys as without LoRA), ``lora`` the adapter-wrapped model
    with the kept adapter (to save), ``lora_record`` what ``summary.json["lora"]`` says.

    ``steps``: the last checkpoint's step (``finetune.steps``, or fewer when the guard stopped early);
    ``reused_steps``: how many of them came from a checkpoint that an earlier call stored (0: trained from the
    start in this call; ``steps``: nothing left to train)."""

    state_dict: State
    history: list[dict[str, float]]
    solver: str
    checkpoint_path: str
    kept: str = "last"
    kept_reason: str = ""
    stopped_early: str = ""
    loop_seconds: float | None = None
    lora: Any = None  # with finetune.lora: the driver's `pipelines.lora.LoraModel` holding the kept adapter
    lora_record: dict[str, Any] | None = None
    steps: int = 0
    reused_steps: int = 0


def run_finetune(
    job: FinetuneJob, *, name: str, storage_path: str, callbacks: list[Any] | None = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Run ``job`` on the TorchTrainer (``finetune.backend`` ray) or in this process (local), with its
    checkpoints under ``storage_path/name``.

    ``callbacks`` go to the trainer's ``RunConfig`` (e.g. a Tune trial's ``TuneReportCallback``). Steps of a
    checkpoint that another call (another ``job.call``) stored count as reused.
    """
    settings = job.settings
    local = _check(settings, callbacks)
    log(
        f"[finetune] solver={job.solver}, {1 if local else settings.num_workers} workers{' (local)' if local else ''}, "
        f"{job.steps} steps, global batch {settings.batch_size}"
    )
    lora_model = driver_lora(job.lora, job.model_config, job.base_state, job.init_adapter, log)
    fit = _fit_local if local else _fit_ray
    blob, history, where = fit(job, name=name, storage_path=storage_path, callbacks=callbacks)
    guard = job.guard()
    guard.load_state_dict(blob["guard"])
    kept, why = guard.keep()
    log(f"[finetune] kept the {kept} state: {why}")
    state = _kept_state(blob, kept, job.init_state or job.base_state)
    record = None
    if lora_model is not None:
        adapter = None if kept == "base" else state  # the base: the starting adapter (fresh, or init_adapter)
        state, record = lora_outcome(lora_model, job.lora, adapter, blob.get("peak_memory_bytes"))
    loop_seconds, steps, reused = _timing_and_steps(blob, job.call)
    return FinetuneResult(state, history, job.solver, where, kept, why, guard.stopped, loop_seconds,
                          lora=lora_model, lora_record=record, steps=steps, reused_steps=reused)


def _timing_and_steps(blob: dict[str, Any], call: str) -> tuple[float | None, int, int]:
    """The last checkpoint's loop seconds, last step, and the steps it reused (all of them when an earlier call
    stored it)."""
    loop_seconds, steps = blob.get("loop_seconds"), int(blob["step"])
    reused = int(blob.get("reused_steps", 0)) if blob.get("call") == call else steps
    return None if loop_seconds is None else float(loop_seconds), steps, reused


def _check(settings: FinetuneConfig, callbacks: list[Any] | None) -> bool:
    """Whether the loop runs locally (``finetune.backend: local``), which cannot report to Tune callbacks."""
    local = settings.backend == "local"
    if local and callbacks:
        raise ConfigError("'finetune.backend' local cannot report to Tune callbacks (sweeps): use ray")
    return local


def _kept_state(blob: dict[str, Any], kept: str, start: State) -> State:
    """The state the guard kept: the start (a copy), the best checkpointed state, or the last."""
    if kept == "base":
        return {k: v.detach().cpu().clone() for k, v in start.items()}
    return blob["best"] if kept == "best" and blob.get("best") is not None else blob["model"]


def _fit_ray(job: FinetuneJob, *, name: str, storage_path: str, callbacks: list[Any] | None) -> Fitted:
    """The TorchTrainer: (the result checkpoint's ``state.pt``, the kept checkpoints' metrics, its path)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.raysession import environ
    from pipelines.storage import ray_storage

    finetune = job.settings
    filesystem, storage_path = ray_storage(storage_path)  # a store URI: its filesystem and the path in it
    resources = {"CPU": finetune.cpus_per_worker, **{k: float(v) for k, v in finetune.resources_per_worker.items()}}
    if finetune.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=finetune.num_workers, use_gpu=finetune.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=finetune.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Train's INFO lines repeat every report, and without the dashboard its placement-group
            # cleaner warns every few seconds that the state API is down; rank 0 prints progress instead.
            logging_config=LoggingConfig(log_level="ERROR"),
            callbacks=callbacks,
        ),
    )
    # Train's controller reads its poll interval from the environment (copied to its actor at fit)
    with environ(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=str(finetune.poll_interval_s)):
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"fine-tuning failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        blob = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=True)
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return blob, history, result.checkpoint.path


def _fit_local(job: FinetuneJob, *, name: str, storage_path: str, callbacks: list[Any] | None) -> Fitted:
    """The same loop in this process (`pipelines.train_session.LocalSession`, checkpoints under
    ``storage_path/name``); returns what :func:`_fit_ray` does. Restores this process's torch thread count and
    matmul precision afterwards (the loop sets them)."""
    from pipelines.train_session import LocalSession, local_checkpoints

    device = torch.device("cuda:0" if job.settings.use_gpu else "cpu")
    session = LocalSession(os.path.join(storage_path, name), device, num_to_keep=2)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        run_loop(job, session)
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    kept = local_checkpoints(session.run_dir)
    if not kept:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    blob = torch.load(kept[-1] / "state.pt", map_location="cpu", weights_only=True)
    return blob, session.kept_metrics(), str(kept[-1])
