"""The fine-tuning stage: a Ray Train ``TorchTrainer`` worker group (DDP; gloo on CPU), or with
``finetune.backend: local`` the same loop in the calling process (one worker, no Ray Train; for short runs).

Each worker draws its own trajectories from the current model, computes the reward and its gradient
itself, and builds the adjoint-matching loss (DESIGN §6); DDP all-reduces the gradients. With
``solver: weighted`` each worker instead fits the tilt-weighted flow-matching loss on the bank
(DESIGN §7). The loop talks to a `pipelines.train_session` session (Ray Train's or the local one).
Metrics go through the session's ``report`` every ``log_every`` steps (a barrier on every
worker), checkpoints every ``checkpoint_every`` steps; rank 0 logs metrics to MLflow. A restarted
worker group continues from the latest checkpoint.

With conditions (``conditions``: the list of values) every training trajectory draws its condition uniformly
from the step's seeded generator, the reward gets each sample's condition value and the pseudo-reward each row's
own threshold (``objective["eta"]`` a list per condition); the weighted solver gets each bank row's condition.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipelines.lr_schedule import lr_factor
from pipelines.train_session import TrainSession

__all__ = ["FinetuneResult", "train_loop", "run_loop", "run_finetune"]


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned weights, the metrics history reported by rank 0, the solver used, and which state the
    guard kept (``kept``: "best" | "last") with the reason and, if it stopped training early, why.

    With LoRA, ``state_dict`` is the merged network (keys as without LoRA), ``lora`` the adapter-wrapped model
    with the kept adapter (to save), ``lora_record`` what ``summary.json["lora"]`` says."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    solver: str
    checkpoint_path: str
    kept: str = "last"
    kept_reason: str = ""
    stopped_early: str = ""
    loop_seconds: float | None = None
    lora: Any = None  # with finetune.lora: the driver's `pipelines.lora.LoraModel` holding the kept adapter
    lora_record: dict[str, Any] | None = None


def _quiet_train_logs() -> None:
    import logging

    # Train logs every report at INFO; rank 0 prints one progress line per report instead.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this module names its logger by file path ("Reporting training result ..." on every report)
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: only the noise stays
        pass


def _pseudo_reward_fn(config: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
    """x1 -> PseudoReward from the user's reward (values and gradients) and the objective (eta, side, alpha)."""
    from rewards.base import load_reward
    from tfft.pseudo import pseudo_reward_signal

    from tfft.conditions import row_values

    reward = load_reward(config["reward_target"], config["reward_kwargs"])
    objective = config["objective"]
    conditions = config.get("conditions")

    def fn(x1: torch.Tensor, cond: torch.Tensor | None = None) -> Any:
        if cond is None:
            out, grad_r = reward.evaluate_with_grad(x1.to(torch.float64))
            eta = objective["eta"]
        else:
            values = [conditions[i] for i in cond.tolist()]
            out, grad_r = reward.evaluate_with_grad(x1.to(torch.float64), cond=values)
            eta = row_values(objective["eta"], cond)
            eta = eta.to(torch.float64) if isinstance(eta, torch.Tensor) else eta
        return pseudo_reward_signal(
            out.rewards.to(torch.float64), grad_r.to(torch.float64), out.valid,
            eta=eta, side=objective["side"], alpha=objective["alpha"],
            grad_clip=config["reward_grad_clip"],
        )

    return fn


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "do not broadcast buffers in every forward" (renamed in torch 2.13)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if new else {"broadcast_buffers": False}


def _build_solver(config: dict[str, Any], model: torch.nn.Module, base: torch.nn.Module, device: Any) -> Any:
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver, WeightedFlowMatchingSolver

    if config["solver"] == "weighted":
        bank_x = torch.as_tensor(np.array(config["bank_x"]), dtype=torch.float32, device=device)
        bank_cond = config.get("bank_cond")
        return WeightedFlowMatchingSolver(model, bank_x, torch.as_tensor(np.array(config["bank_weights"])),
                                          base=base if config["anchor"] else None, time_power=config["time_power"],
                                          bank_cond=None if bank_cond is None else torch.as_tensor(np.array(bank_cond)))
    am = AdjointMatchingConfig(
        kl_weight=config["objective"]["kl_weight"], steps=config["sde_steps"], late_fraction=config["late_fraction"],
        n_early=config["n_early"], normalize=config["normalize"], clip_quantile=config["clip_quantile"],
        clip_factor=config["clip_factor"],
        oversample=config["oversample"], fast=config["fast_path"], loss_chunk=config.get("loss_chunk", 0),
    )
    return AdjointMatchingSolver(model, base, _pseudo_reward_fn(config), am)


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
    """``train_loop_per_worker`` of the TorchTrainer: :func:`run_loop` in a `RayTrainSession`."""
    from pipelines.train_session import RayTrainSession

    loop_started = time.time()  # the loop's own time, without the worker group's start-up
    _quiet_train_logs()
    run_loop(config, RayTrainSession(), loop_started=loop_started)


def run_loop(config: dict[str, Any], session: TrainSession, *, loop_started: float | None = None) -> None:
    """Build, step the solver, all-reduce, report: one worker's loop, talking only to ``session``.

    ``config`` keys: see :func:`run_finetune`. Checkpoints hold the model, the optimiser, the solver's running
    statistics, the guard's state and the best state so far.
    """
    from pipelines.guard import Guard

    loop_started = time.time() if loop_started is None else loop_started
    rank, world = session.world_rank, session.world_size
    torch.set_num_threads(max(1, int(config["threads"])))
    torch.set_float32_matmul_precision(config["matmul_precision"])
    device = session.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, base, lora = _build_models(config, device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                           fused=device.type == "cuda")  # fewer kernels on GPU
    # Linear warm-up (Adam's first steps are full-size in every direction before its moments settle), then the
    # schedule's decay: a constant rate leaves the last state with the optimiser's noise in it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=config["steps"], warmup=config["warmup_steps"],
                               schedule=config["lr_schedule"]))
    guard = Guard(enabled=config["guard"], metric=config["guard_metric"], min_valid_fraction=config["min_valid_fraction"],
                  patience=config["guard_patience"], baseline=config["guard_baseline"])
    solver_state, best_state, start_step = None, None, 0
    with session.latest_checkpoint() as ckpt_dir:
        blob = None if ckpt_dir is None else torch.load(os.path.join(ckpt_dir, "state.pt"), map_location=device,
                                                          weights_only=True)
    if blob is not None:
        _load_model_state(model, lora, blob["model"])
        opt.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        start_step, solver_state, best_state = int(blob["step"]), blob["solver"], blob.get("best")
        guard.load_state_dict(blob["guard"])
    # The velocity networks' buffers are constants (time-embedding frequencies): DDP's default would broadcast
    # them in every forward, and the fast path runs several forwards per step.
    model = session.prepare_model(model, **_no_buffer_sync())
    solver = _build_solver(config, model, base, device)
    if solver_state:
        solver.load_state_dict(solver_state)
    local_batch = max(1, config["batch_size"] // world)
    tracker = None
    if rank == 0 and config.get("mlflow"):
        from pipelines.tracking import MetricLogger

        tracker = MetricLogger(**config["mlflow"])
    sums: dict[str, torch.Tensor] = {}
    for step in range(start_step + 1, config["steps"] + 1):
        seed = config["seed"] * 100_003 + step * 1009 + rank
        gen = torch.Generator(device=device).manual_seed(seed)
        opt.zero_grad(set_to_none=True)  # before the step: a chunked loss backpropagates inside it
        if config["solver"] == "adjoint":
            x0 = torch.randn(local_batch * config["oversample"], config["dim"], generator=gen, device=device)
            cond = None
            if config.get("conditions"):
                from tfft.conditions import uniform_conditions

                cond = uniform_conditions(x0.shape[0], len(config["conditions"]), generator=gen, device=device)
            result = solver.step(x0, gen, cond)
        else:
            result = solver.step(local_batch, gen, index_generator=torch.Generator().manual_seed(seed))
        result.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        metrics = dict(result.metrics, grad_norm=grad_norm.detach(),
                       grad_clipped=(grad_norm > config["grad_clip"]).to(torch.float64))
        for name in _GUARDED:
            if name in metrics:
                metrics[f"{name}_sq"] = metrics[name] ** 2
        opt.step()
        scheduler.step()
        for k, v in metrics.items():
            sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
        last = step == config["steps"]
        if step % config["log_every"] and not last:
            continue
        window = _window_metrics(sums, (step - 1) % config["log_every"] + 1, world)
        sums = {}
        metric = config["guard_metric"]
        decision = guard.update(step, window.get(metric), window.get(f"{metric}_se", 0.0),
                                window.get("valid_fraction", 1.0))
        if decision.improved and rank == 0:
            best_state = _model_state(model, lora)
        stop = decision.stop
        report = {"step": step, **window}
        if rank == 0:
            _progress(step, config["steps"], window, decision.reason)
        if tracker is not None:
            tracker.log(window, step=step)
        save = step % config["checkpoint_every"] == 0 or last or stop
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                state = _model_state(model, lora)
                blob = {"model": state, "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                        "solver": solver.state_dict(),
                        "guard": guard.state_dict(), "best": best_state, "stopped": stop,
                        "loop_seconds": time.time() - loop_started, "peak_memory_bytes": _peak_memory(device)}
                torch.save(blob, os.path.join(tmp, "state.pt"))
                session.report(report, checkpoint_dir=tmp)
        else:
            session.report(report)
        if stop:
            break


def _build_models(config: dict[str, Any], device: Any) -> tuple[Any, Any, Any]:
    """(trained model, frozen base velocity, `pipelines.lora.LoraModel` or None) on ``device``.

    Without LoRA the base is a separate frozen copy. With ``config["lora"]`` the model is the base network with
    adapters (fresh, or ``config["init_adapter"]``), only they require gradients, and the base is the same model
    with its adapters switched off (`pipelines.lora.AdapterOffVelocity`): one copy of the weights.
    """
    from pipelines.lora import enable_checkpointing

    if config.get("lora"):
        from pipelines.lora import LoraSettings, build_lora_model

        lora = build_lora_model(config["model_config"], config["base_state"], LoraSettings.from_dict(config["lora"]),
                                adapter=config.get("init_adapter"))
        if config.get("gradient_checkpointing"):
            enable_checkpointing(lora.velocity)
        return lora.velocity.to(device), lora.base, lora
    from pipelines.models import build_model

    base = build_model(config["model_config"], config["base_state"]).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    model = build_model(config["model_config"], config.get("init_state") or config["base_state"]).to(device)
    if config.get("gradient_checkpointing"):
        enable_checkpointing(model)
    return model, base, None


def _model_state(model: torch.nn.Module, lora: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: its state dict, or with LoRA only the adapter (peft's format)."""
    if lora is not None:
        from pipelines.lora import adapter_state

        return adapter_state(lora.peft)
    return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}


def _load_model_state(model: torch.nn.Module, lora: Any, state: dict[str, torch.Tensor]) -> None:
    if lora is not None:
        from pipelines.lora import load_adapter

        load_adapter(lora.peft, state)
    else:
        model.load_state_dict(state)


def _peak_memory(device: Any) -> int | None:
    """Peak bytes allocated on a CUDA device since the loop started (None elsewhere)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


_SHOWN = ("loss_ratio", "objective", "kl", "mean_reward", "active_fraction", "valid_fraction", "clipped_fraction",
          "grad_clipped", "loss")


def _progress(step: int, total: int, window: dict[str, float], reason: str) -> None:
    shown = ", ".join(f"{k} {window[k]:.4g}" for k in _SHOWN if k in window)
    # sys.stdout directly: Train's patched print() would echo the line twice
    sys.stdout.write(f"[finetune] step {step}/{total}: {shown}\n")
    if reason:
        sys.stdout.write(f"[finetune] GUARD: stopping early: {reason}\n")
    sys.stdout.flush()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def run_finetune(
    *,
    name: str,
    storage_path: str,
    model_config: dict[str, Any],
    base_state: dict[str, torch.Tensor],
    objective: dict[str, Any],
    finetune: Any,
    reward_target: str,
    reward_kwargs: dict[str, Any],
    seed: int,
    solver: str,
    bank_x: np.ndarray | None = None,
    bank_weights: np.ndarray | None = None,
    mlflow: dict[str, Any] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    steps: int | None = None,
    callbacks: list[Any] | None = None,
    sde_steps: int | None = None,
    min_valid_fraction: float = 0.0,
    guard_baseline: float | None = None,
    conditions: list[Any] | None = None,
    bank_cond: np.ndarray | None = None,
    log: Callable[[str], None] = print,
    lora: Any = None,
    init_adapter: dict[str, torch.Tensor] | None = None,
) -> FinetuneResult:
    """Run the TorchTrainer (``finetune.backend`` ray) or the same loop in this process (local); rerunning with
    the same ``(storage_path, name)`` and backend resumes its checkpoints.

    ``init_state`` warm-starts the fine-tuned network (threshold refinement); the base stays the base.
    ``steps`` overrides ``finetune.steps``. ``callbacks`` go to the trainer's ``RunConfig`` (e.g. a Tune
    trial's ``TuneReportCallback``). ``sde_steps`` is the training trajectories' K (None: the bank sampler's
    ``sampler.steps`` is not known here, so the caller resolves it; falls back to ``finetune.sde_steps``).
    ``min_valid_fraction``: the guard's validity floor for the training samples; ``guard_baseline``: the base
    model's objective E_q[g] for the guard (None: its first window). ``conditions``: the condition values of a
    conditional run (module docstring); ``bank_cond``: the weighted solver's bank rows' condition indices.
    ``lora``: `pipelines.lora.LoraSettings` (None: full fine-tuning); then only adapters train, ``init_adapter``
    (peft's format) warm-starts them, and the result's ``state_dict`` is the merged network.
    """
    sde_steps = int(sde_steps or finetune.sde_steps)
    if sde_steps < 1:
        raise ValueError("run_finetune needs sde_steps (the sampler's step count) when finetune.sde_steps is 0")
    loop_config = {
        "model_config": model_config,
        "base_state": base_state,
        "init_state": None if lora is not None else init_state,  # LoRA warm-starts from init_adapter
        "objective": objective,
        "solver": solver,
        "reward_target": reward_target,
        "reward_kwargs": dict(reward_kwargs),
        "seed": seed,
        "dim": int(model_config["dim"]),
        "steps": finetune.steps if steps is None else steps,
        "batch_size": finetune.batch_size,
        "lr": finetune.lr,
        "warmup_steps": finetune.warmup_steps,
        "lr_schedule": finetune.lr_schedule,
        "anchor": finetune.anchor,
        "time_power": finetune.time_power,
        "sde_steps": sde_steps,
        "normalize": finetune.normalize,
        "clip_quantile": finetune.clip_quantile,
        "clip_factor": finetune.clip_factor,
        "oversample": finetune.oversample if solver == "adjoint" else 1,
        "fast_path": finetune.fast_path,
        "loss_chunk": finetune.loss_chunk,
        "gradient_checkpointing": finetune.gradient_checkpointing,
        "matmul_precision": finetune.matmul_precision,
        "guard": finetune.guard,
        "min_valid_fraction": min_valid_fraction,
        "guard_patience": finetune.guard_patience,
        "guard_baseline": guard_baseline,
        "guard_metric": finetune.guard_metric,
        "late_fraction": finetune.late_fraction,
        "n_early": finetune.n_early,
        "log_every": finetune.log_every,
        "checkpoint_every": finetune.checkpoint_every,
        "grad_clip": finetune.grad_clip,
        "reward_grad_clip": finetune.reward_grad_clip,
        "threads": max(1, int(finetune.cpus_per_worker)),
        "bank_x": bank_x,
        "bank_weights": bank_weights,
        "mlflow": mlflow,
        "lora": None if lora is None else lora.to_dict(),
        "init_adapter": init_adapter,
    }
    if conditions:  # only when set: an unconditional loop config is unchanged
        loop_config.update(conditions=list(conditions), bank_cond=bank_cond)
    backend = getattr(finetune, "backend", "ray")
    if backend == "local" and callbacks:
        from pipelines.config import ConfigError

        raise ConfigError("'finetune.backend' local cannot report to Tune callbacks (sweeps): use ray")
    workers = 1 if backend == "local" else finetune.num_workers
    log(
        f"[finetune] solver={solver}, {workers} workers{' (local)' if backend == 'local' else ''}, "
        f"{loop_config['steps']} steps, global batch {finetune.batch_size}"
    )
    lora_model = _driver_lora(lora, model_config, base_state, init_adapter, log)
    fit = _fit_local if backend == "local" else _fit_ray
    blob, history, checkpoint_path = fit(loop_config, finetune, name=name, storage_path=storage_path,
                                         callbacks=callbacks)
    from pipelines.guard import Guard

    guard = Guard(enabled=finetune.guard, metric=finetune.guard_metric, baseline=guard_baseline)
    guard.load_state_dict(blob["guard"])
    kept, why = guard.keep()
    if kept == "base":
        state = {k: v.detach().cpu().clone() for k, v in (init_state or base_state).items()}
    else:
        state = blob["best"] if kept == "best" and blob.get("best") is not None else blob["model"]
    log(f"[finetune] kept the {kept} state: {why}")
    loop_seconds = blob.get("loop_seconds")
    record = None
    if lora_model is not None:
        adapter = None if kept == "base" else state  # the base: the starting adapter (fresh, or init_adapter)
        state, record = _lora_outcome(lora_model, lora, adapter, blob.get("peak_memory_bytes"))
    return FinetuneResult(state, history, solver, checkpoint_path, kept, why, guard.stopped,
                          None if loop_seconds is None else float(loop_seconds), lora_model, record)


def _fit_ray(loop_config: dict[str, Any], finetune: Any, *, name: str, storage_path: str,
             callbacks: list[Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """The TorchTrainer: (the result checkpoint's ``state.pt``, the kept checkpoints' metrics, its path)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
               callbacks: list[Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
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


def _driver_lora(lora: Any, model_config: dict[str, Any], base_state: dict[str, torch.Tensor],
                 init_adapter: dict[str, torch.Tensor] | None, log: Callable[[str], None]) -> Any:
    """The LoRA model on the driver (None without LoRA): it counts the parameters for the log line, and after
    training it takes the kept adapter, to merge and save."""
    if lora is None:
        return None
    from pipelines.lora import build_lora_model, count_parameters, lora_log_line

    model = build_lora_model(model_config, base_state, lora, adapter=init_adapter)
    log(lora_log_line(lora, *count_parameters(model.velocity)))
    return model


def _lora_outcome(lora_model: Any, lora: Any, adapter: dict[str, torch.Tensor] | None,
                  peak_memory: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(merged state with ``adapter`` loaded (None: keep the starting one), ``summary.json["lora"]``)."""
    from pipelines.lora import count_parameters, load_adapter, merged_state

    if adapter is not None:
        load_adapter(lora_model.peft, adapter)
    trainable, total = count_parameters(lora_model.velocity)
    record = {**lora.to_dict(), "target_modules": list(lora_model.targets), "patterns": list(lora.target_modules),
              "trainable": trainable, "total": total}
    if peak_memory is not None:
        record["peak_memory_bytes"] = int(peak_memory)
    return merged_state(lora_model.peft), record
