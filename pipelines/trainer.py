"""The fine-tuning run, from the driver: a Ray Train ``TorchTrainer`` worker group (DDP; gloo on CPU), or with
``finetune.backend: local`` the same loop in the calling process (one worker, no Ray Train; for short runs).

:func:`run_finetune` turns its arguments into the workers' loop config (a plain dict of picklable values, the
objective among them as the `tfft.objective.Tilt` itself: it travels to every worker), fits, and returns the
state the guard keeps (`pipelines.guard`). The loop itself is `pipelines.finetune.run_loop`. A restarted worker
group continues from the latest checkpoint, and rerunning with the same ``(storage_path, name)`` and backend
resumes.

With conditions (``conditions``: the list of values) every training trajectory draws its condition uniformly
from the step's seeded generator, the reward gets each sample's condition value and the pseudo-reward each row's
own threshold (the tilt's ``eta`` a tuple per condition); the weighted solver gets each bank row's condition.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipelines.config import ConfigError
from pipelines.finetune import run_loop, train_loop
from pipelines.guard import Guard
from pipelines.lora_io import driver_lora, lora_outcome
from tfft.objective import Tilt

__all__ = ["FinetuneResult", "run_finetune"]

State = dict[str, torch.Tensor]
Fitted = tuple[dict[str, Any], list[dict[str, Any]], str]  # (the last checkpoint's state.pt, metrics, its path)

# ``finetune.*`` settings the loop reads under the same name
_LOOP_SETTINGS = (
    "batch_size", "lr", "warmup_steps", "lr_schedule", "anchor", "time_power", "normalize", "clip_quantile",
    "clip_factor", "fast_path", "loss_chunk", "gradient_checkpointing", "autocast", "reweight", "matmul_precision",
    "guard", "guard_patience", "guard_metric", "late_fraction", "n_early", "log_every", "checkpoint_every",
    "grad_clip", "reward_grad_clip", "oversample",
)


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
    *, name: str, storage_path: str, model_config: dict[str, Any], base_state: State, tilt: Tilt,
    finetune: Any, reward_target: str, reward_kwargs: dict[str, Any], seed: int, solver: str,
    bank_x: np.ndarray | None = None, bank_weights: np.ndarray | None = None, mlflow: dict[str, Any] | None = None,
    init_state: State | None = None, steps: int | None = None, callbacks: list[Any] | None = None,
    sde_steps: int | None = None, min_valid_fraction: float = 0.0, guard_baseline: float | None = None,
    conditions: list[Any] | None = None, bank_cond: np.ndarray | None = None, log: Callable[[str], None] = print,
    lora: Any = None, init_adapter: State | None = None, call: str | None = None,
) -> FinetuneResult:
    """Run the TorchTrainer (``finetune.backend`` ray) or the same loop in this process (local).

    ``tilt``: the objective, whose pseudo-reward and KL weight the adjoint solver fine-tunes for; ``solver``:
    adjoint | weighted, as resolved by `pipelines.stages.preflight.resolve_plan` (the weighted one fits
    ``bank_x`` with the frozen ``bank_weights``, the caller's tilt weights of the bank).
    ``init_state`` warm-starts the fine-tuned network (threshold refinement); the base stays the base.
    ``steps`` overrides ``finetune.steps``. ``callbacks`` go to the trainer's ``RunConfig`` (e.g. a Tune
    trial's ``TuneReportCallback``). ``sde_steps`` is the training trajectories' K (None: the bank sampler's
    ``sampler.steps`` is not known here, so the caller resolves it; falls back to ``finetune.sde_steps``).
    ``min_valid_fraction``: the guard's validity floor for the training samples; ``guard_baseline``: the base
    model's objective E_q[g] for the guard (None: its first window). ``conditions``: the condition values of a
    conditional run (module docstring); ``bank_cond``: the weighted solver's bank rows' condition indices.
    ``lora``: `pipelines.lora.LoraSettings` (None: full fine-tuning); then only adapters train, ``init_adapter``
    (peft's format) warm-starts them, and the result's ``state_dict`` is the merged network. ``call`` names this call
    in its checkpoints (default: a fresh token): steps an earlier call stored count as reused, a restart's as run.
    """
    k = _sde_steps(finetune, sde_steps)
    local = _check(finetune, callbacks)
    loop_config = {
        **{key: getattr(finetune, key) for key in _LOOP_SETTINGS},
        "model_config": model_config, "base_state": base_state, "tilt": tilt, "solver": solver,
        "init_state": None if lora is not None else init_state,  # LoRA warm-starts from init_adapter
        "reward_target": reward_target, "reward_kwargs": dict(reward_kwargs), "seed": seed,
        "dim": int(model_config["dim"]), "steps": finetune.steps if steps is None else steps,
        "sde_steps": k,
        "min_valid_fraction": min_valid_fraction, "guard_baseline": guard_baseline,
        "threads": max(1, int(finetune.cpus_per_worker)), "bank_x": bank_x, "bank_weights": bank_weights,
        "mlflow": mlflow, "lora": None if lora is None else lora.to_dict(), "init_adapter": init_adapter,
        "call": call or uuid.uuid4().hex,  # tells this call's checkpoints from an earlier call's (pipelines.finetune)
    }
    if conditions:  # only when set: an unconditional loop config is unchanged
        loop_config.update(conditions=list(conditions), bank_cond=bank_cond)
    log(
        f"[finetune] solver={solver}, {1 if local else finetune.num_workers} workers{' (local)' if local else ''}, "
        f"{loop_config['steps']} steps, global batch {finetune.batch_size}"
    )
    lora_model = driver_lora(lora, model_config, base_state, init_adapter, log)
    fit = _fit_local if local else _fit_ray
    blob, history, where = fit(loop_config, finetune, name=name, storage_path=storage_path, callbacks=callbacks)
    guard = Guard(enabled=finetune.guard, metric=finetune.guard_metric, baseline=guard_baseline)
    guard.load_state_dict(blob["guard"])
    kept, why = guard.keep()
    log(f"[finetune] kept the {kept} state: {why}")
    state = _kept_state(blob, kept, init_state or base_state)
    record = None
    if lora_model is not None:
        adapter = None if kept == "base" else state  # the base: the starting adapter (fresh, or init_adapter)
        state, record = lora_outcome(lora_model, lora, adapter, blob.get("peak_memory_bytes"))
    loop_seconds, steps, reused = _timing_and_steps(blob, loop_config["call"])
    return FinetuneResult(state, history, solver, where, kept, why, guard.stopped, loop_seconds,
                          lora=lora_model, lora_record=record, steps=steps, reused_steps=reused)


def _timing_and_steps(blob: dict[str, Any], call: str) -> tuple[float | None, int, int]:
    """The last checkpoint's loop seconds, last step, and the steps it reused (all of them when an earlier call
    stored it)."""
    loop_seconds, steps = blob.get("loop_seconds"), int(blob["step"])
    reused = int(blob.get("reused_steps", 0)) if blob.get("call") == call else steps
    return None if loop_seconds is None else float(loop_seconds), steps, reused


def _check(finetune: Any, callbacks: list[Any] | None) -> bool:
    """Whether the loop runs locally (``finetune.backend: local``), which cannot report to Tune callbacks."""
    local = finetune.backend == "local"
    if local and callbacks:
        raise ConfigError("'finetune.backend' local cannot report to Tune callbacks (sweeps): use ray")
    return local


def _sde_steps(finetune: Any, sde_steps: int | None) -> int:
    """The training trajectories' K: ``sde_steps``, else ``finetune.sde_steps``; at least 1."""
    k = int(sde_steps or finetune.sde_steps)
    if k < 1:
        raise ValueError("run_finetune needs sde_steps (the sampler's step count) when finetune.sde_steps is 0")
    return k


def _kept_state(blob: dict[str, Any], kept: str, start: State) -> State:
    """The state the guard kept: the start (a copy), the best checkpointed state, or the last."""
    if kept == "base":
        return {k: v.detach().cpu().clone() for k, v in start.items()}
    return blob["best"] if kept == "best" and blob.get("best") is not None else blob["model"]


def _fit_ray(loop_config: dict[str, Any], finetune: Any, *, name: str, storage_path: str,
             callbacks: list[Any] | None) -> Fitted:
    """The TorchTrainer: (the result checkpoint's ``state.pt``, the kept checkpoints' metrics, its path)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.raysession import environ
    from pipelines.storage import ray_storage

    filesystem, storage_path = ray_storage(storage_path)  # a store URI: its filesystem and the path in it
    resources = {"CPU": finetune.cpus_per_worker, **{k: float(v) for k, v in finetune.resources_per_worker.items()}}
    if finetune.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
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


def _fit_local(loop_config: dict[str, Any], finetune: Any, *, name: str, storage_path: str,
               callbacks: list[Any] | None) -> Fitted:
    """The same loop in this process (`pipelines.train_session.LocalSession`, checkpoints under
    ``storage_path/name``); returns what :func:`_fit_ray` does. Restores this process's torch thread count and
    matmul precision afterwards (the loop sets them)."""
    from pipelines.train_session import LocalSession, local_checkpoints

    device = torch.device("cuda:0" if finetune.use_gpu else "cpu")
    session = LocalSession(os.path.join(storage_path, name), device, num_to_keep=2)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        run_loop(loop_config, session)
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    kept = local_checkpoints(session.run_dir)
    if not kept:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    blob = torch.load(kept[-1] / "state.pt", map_location="cpu", weights_only=True)
    return blob, session.kept_metrics(), str(kept[-1])
