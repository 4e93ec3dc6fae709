"""One fine-tuning worker's loop (:func:`run_loop`), in a Ray Train worker group or in the driver's process.

Each worker draws its own trajectories from the current model, computes the reward and its gradient
itself, and builds the adjoint-matching loss (DESIGN §6); DDP all-reduces the gradients. With
``solver: weighted`` each worker instead fits the tilt-weighted flow-matching loss on the bank
(DESIGN §7). The loop talks to a `pipelines.train_session` session (Ray Train's or the local one).
Metrics go through the session's ``report`` every ``log_every`` steps (a barrier on every
worker), checkpoints every ``checkpoint_every`` steps; rank 0 logs metrics to MLflow. A restarted
worker group continues from the latest checkpoint. The driver's side is `pipelines.trainer.run_finetune`;
what a worker builds (networks, solver, checkpoint state) is `pipelines.train_build`.

Every checkpoint names the driver call that wrote it (the job's ``call``, a token per `run_finetune` call) and
how many of its steps were taken from a checkpoint of an earlier call (``reused_steps``): a worker that resumes
from another call's checkpoint reuses all of its steps; one restarted within the same call keeps the count.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.finetune_job import FinetuneJob
from pipelines.guard import Guard
from pipelines.lr_schedule import lr_factor
from pipelines.train_build import (build_models, build_solver, holdout_metrics, load_model_state, model_state,
                                   no_buffer_sync)
from pipelines.train_session import TrainSession

__all__ = ["train_loop", "run_loop"]


_GUARDED = ("objective", "pseudo_reward")  # metrics whose standard error over a window is reported


def _window_metrics(sums: dict[str, torch.Tensor], count: int, world: int) -> dict[str, float]:
    """All-reduce the window's metric sums (one call) and turn them into means; objective_se from the squares."""
    import torch.distributed as dist

    names = sorted(sums)
    totals = torch.stack([sums[k].detach().to(torch.float64).cpu() for k in names])
    if world > 1:
        dist.all_reduce(totals)
    n = count * world
    means = {k: float(v) / n for k, v in zip(names, totals.tolist())}
    if "loss_at_base" in means:
        means["loss_ratio"] = means["loss"] / means["loss_at_base"] if means["loss_at_base"] > 0 else float("nan")
    for name in _GUARDED:
        if f"{name}_sq" in means:
            var = max(means.pop(f"{name}_sq") - means[name] ** 2, 0.0)
            means[f"{name}_se"] = (var / max(n - 1, 1)) ** 0.5
    return means


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer: :func:`run_loop` of ``config["job"]`` in a
    `RayTrainSession`."""
    from pipelines.train_session import RayTrainSession, quiet_train_logs

    loop_started = time.time()  # the loop's own time, without the worker group's start-up
    quiet_train_logs()
    run_loop(config["job"], RayTrainSession(), loop_started=loop_started)


@dataclass
class _Worker:
    """One worker's training state: the (DDP-prepared) model and its LoRA handle, the optimiser and its
    schedule, the guard, the solver and its ``step(local_batch, generator, seed)`` (`pipelines.train_build`),
    rank 0's MLflow logger, the step to resume after and the best state."""

    model: torch.nn.Module
    lora: Any
    opt: torch.optim.Optimizer
    scheduler: Any
    guard: Guard
    solver: Any
    step: Any
    tracker: Any
    start_step: int
    best_state: dict[str, torch.Tensor] | None
    call: str = ""
    reused_steps: int = 0


def run_loop(job: FinetuneJob, session: TrainSession, *, loop_started: float | None = None) -> None:
    """Build, step the solver, all-reduce, report: one worker's loop of ``job``, talking only to ``session``.

    Checkpoints hold the model, the optimiser, the solver's
    running statistics, the guard's state and the best state so far.
    """
    loop_started = time.time() if loop_started is None else loop_started
    worker = _start(job, session)
    try:
        _steps(job, session, worker, loop_started)
    finally:
        if worker.tracker is not None:
            worker.tracker.close()  # every queued window reaches MLflow before the worker returns


def _steps(job: FinetuneJob, session: TrainSession, worker: _Worker, loop_started: float) -> None:
    """The steps from the worker's start step: solver step, backward, clip, optimiser and schedule; a window's
    metrics all-reduced and handed to :func:`_end_window` every ``log_every`` steps and at the last."""
    rank, world, device = session.world_rank, session.world_size, session.device
    settings = job.settings
    model, opt = worker.model, worker.opt
    local_batch = max(1, settings.batch_size // world)
    sums: dict[str, torch.Tensor] = {}
    for step in range(worker.start_step + 1, job.steps + 1):
        seed = job.seed * 100_003 + step * 1009 + rank
        gen = torch.Generator(device=device).manual_seed(seed)
        opt.zero_grad(set_to_none=True)  # before the step: a chunked loss backpropagates inside it
        result = worker.step(local_batch, gen, seed)
        result.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        metrics = dict(result.metrics, grad_norm=grad_norm.detach(),
                       grad_clipped=(grad_norm > settings.grad_clip).to(torch.float64))
        for name in _GUARDED:
            if name in metrics:
                metrics[f"{name}_sq"] = metrics[name] ** 2
        opt.step()
        worker.scheduler.step()
        for k, v in metrics.items():
            sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
        last = step == job.steps
        if step % settings.log_every and not last:
            continue
        window = _window_metrics(sums, (step - 1) % settings.log_every + 1, world)
        sums = {}
        window.update(holdout_metrics(worker.solver))
        if _end_window(job, session, worker, step, window, last=last, loop_started=loop_started):
            break


def _start(job: FinetuneJob, session: TrainSession) -> _Worker:
    """Threads and matmul precision set, models, optimiser (Adam, fused on GPU), learning-rate schedule, guard and
    solver built, the latest checkpoint (if any) loaded, the model prepared for DDP."""
    settings = job.settings
    torch.set_num_threads(job.threads)
    torch.set_float32_matmul_precision(settings.matmul_precision)
    device = session.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, base, lora = build_models(job, device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                           fused=device.type == "cuda")  # fewer kernels on GPU
    # Linear warm-up (Adam's first steps are full-size in every direction before its moments settle), then the
    # schedule's decay: a constant rate leaves the last state with the optimiser's noise in it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=job.steps, warmup=settings.warmup_steps,
                               schedule=settings.lr_schedule))
    guard = job.guard()
    start_step, solver_state, best_state, blob_call, reused = _resume(session, model, lora, opt, scheduler, guard)
    call = job.call
    reused = reused if blob_call == call else start_step  # another call's checkpoint: all its steps are reused
    # The velocity networks' buffers are constants (time-embedding frequencies): DDP's default would broadcast
    # them in every forward, and the fast path runs several forwards per step.
    model = session.prepare_model(model, **no_buffer_sync())
    solver, step = build_solver(job, model, base, device)
    if solver_state:
        solver.load_state_dict(solver_state)
    tracker = None
    if session.world_rank == 0 and job.mlflow:
        from pipelines.tracking import MetricLogger

        tracker = MetricLogger(**job.mlflow, background=True)
        tracker.start()  # MLflow's import and client open in the background, beside the first steps
    return _Worker(model, lora, opt, scheduler, guard, solver, step, tracker, start_step, best_state, call, reused)


def _resume(session: TrainSession, model: torch.nn.Module, lora: Any, opt: torch.optim.Optimizer, scheduler: Any,
            guard: Guard) -> tuple[int, Any, dict[str, torch.Tensor] | None, str | None, int]:
    """Load the session's latest checkpoint into the model, optimiser, schedule and guard; returns (its step, the
    solver's state, the best state so far, the call that wrote it, its reused steps), or (0, None, None, None, 0)
    on a fresh start."""
    with session.latest_checkpoint() as ckpt_dir:
        blob = None if ckpt_dir is None else torch.load(os.path.join(ckpt_dir, "state.pt"), map_location=session.device,
                                                          weights_only=True)
    if blob is None:
        return 0, None, None, None, 0
    load_model_state(model, lora, blob["model"])
    opt.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    guard.load_state_dict(blob["guard"])
    return int(blob["step"]), blob["solver"], blob.get("best"), blob.get("call"), int(blob.get("reused_steps", 0))


def _end_window(job: FinetuneJob, session: TrainSession, worker: _Worker, step: int, window: dict[str, float],
                *, last: bool, loop_started: float) -> bool:
    """The guard's decision on the window, the progress line and MLflow (rank 0), the report with a checkpoint
    every ``checkpoint_every`` steps, at the last step and on a stop; returns whether the guard stops training."""
    metric, rank = worker.guard.metric, session.world_rank
    decision = worker.guard.update(step, window.get(metric), window.get(f"{metric}_se", 0.0),
                                   window.get("valid_fraction", 1.0))
    if decision.improved and rank == 0:
        worker.best_state = model_state(worker.model, worker.lora)
    report = {"step": step, **window}
    if rank == 0:
        _progress(step, job.steps, window, decision.reason)
    if worker.tracker is not None:
        worker.tracker.log(window, step=step)
    save = step % job.settings.checkpoint_every == 0 or last or decision.stop
    if save and rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(_checkpoint(worker, step, decision.stop, loop_started, session.device),
                       os.path.join(tmp, "state.pt"))
            session.report(report, checkpoint_dir=tmp)
    else:
        session.report(report)
    return decision.stop


def _checkpoint(worker: _Worker, step: int, stopped: bool, loop_started: float, device: Any) -> dict[str, Any]:
    """``state.pt``: everything a restarted worker resumes from, the loop's time so far and its peak memory."""
    return {"model": model_state(worker.model, worker.lora), "optimizer": worker.opt.state_dict(),
            "scheduler": worker.scheduler.state_dict(), "step": step, "solver": worker.solver.state_dict(),
            "guard": worker.guard.state_dict(), "best": worker.best_state, "stopped": stopped,
            "loop_seconds": time.time() - loop_started, "peak_memory_bytes": _peak_memory(device),
            "call": worker.call, "reused_steps": worker.reused_steps}


def _peak_memory(device: Any) -> int | None:
    """Peak bytes allocated on a CUDA device since the loop started (None elsewhere)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


_SHOWN = ("holdout_gain", "loss_ratio", "objective", "kl", "mean_reward", "active_fraction", "valid_fraction",
          "clipped_fraction", "grad_clipped", "loss")


def _progress(step: int, total: int, window: dict[str, float], reason: str) -> None:
    shown = ", ".join(f"{k} {window[k]:.4g}" for k in _SHOWN if k in window)
    # sys.stdout directly: Train's patched print() would echo the line twice
    sys.stdout.write(f"[finetune] step {step}/{total}: {shown}\n")
    if reason:
        sys.stdout.write(f"[finetune] GUARD: stopping early: {reason}\n")
    sys.stdout.flush()
