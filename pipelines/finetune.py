"""The fine-tuning stage: a Ray Train ``TorchTrainer`` worker group (DDP; gloo on CPU).

Each worker draws its own trajectories from the current model, computes the reward and its gradient
itself, and builds the adjoint-matching loss (DESIGN §6); DDP all-reduces the gradients. With
``solver: weighted`` each worker instead fits the tilt-weighted flow-matching loss on the bank
(DESIGN §7). Metrics go through ``ray.train.report`` every ``log_every`` steps (a barrier on every
worker), checkpoints every ``checkpoint_every`` steps; rank 0 logs metrics to MLflow. A restarted
worker group continues from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["FinetuneResult", "train_loop", "run_finetune"]


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned weights, the metrics history reported by rank 0, and the solver used."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    solver: str
    checkpoint_path: str


def _objective_terms(rewards: torch.Tensor, objective: dict[str, Any]) -> torch.Tensor:
    from tfft.target import pseudo_reward_grad_scale

    return pseudo_reward_grad_scale(
        rewards, eta=objective["eta"], side=objective["side"], alpha=objective["alpha"]
    )


def _batch_metrics(rewards: np.ndarray, valid: np.ndarray, active: np.ndarray) -> list[float]:
    """Sums that can be all-reduced: [n, n_valid, sum reward, n_active]."""
    r = rewards[valid]
    return [float(len(valid)), float(valid.sum()), float(r.sum()) if r.size else 0.0, float(active.sum())]


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer. ``config`` keys: see :func:`run_finetune`."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipelines.pretrain import build_model
    from rewards.base import load_reward
    from tfft.adjoint import adjoint_matching_step
    from tfft.model import flow_matching_loss

    import logging

    # Train logs every report at INFO; rank 0 prints one progress line per report instead.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this module names its logger by file path ("Reporting training result ..." on every report)
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: only the noise stays
        pass
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device()
    base = build_model(config["model_config"], config["base_state"]).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    model = build_model(config["model_config"], config.get("init_state") or config["base_state"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            blob = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location=device, weights_only=True)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        start_step = int(blob["step"])
    model = ray.train.torch.prepare_model(model)
    objective = config["objective"]
    solver = config["solver"]
    reward = load_reward(config["reward_target"], config["reward_kwargs"]) if solver == "adjoint" else None
    local_batch = max(1, config["batch_size"] // world)
    if solver == "weighted":
        bank_x = torch.as_tensor(np.array(config["bank_x"]), dtype=torch.float32, device=device)
        bank_w = torch.as_tensor(np.array(config["bank_weights"]), dtype=torch.float64)
    tracker = None
    if rank == 0 and config.get("mlflow"):
        from pipelines.tracking import MetricLogger

        tracker = MetricLogger(**config["mlflow"])
    sums = np.zeros(5)
    for step in range(start_step + 1, config["steps"] + 1):
        gen = torch.Generator(device=device).manual_seed(config["seed"] * 100_003 + step * 1009 + rank)
        if solver == "adjoint":
            stash: dict[str, np.ndarray] = {}

            def reward_grad_fn(x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                out, grad_r = reward.evaluate_with_grad(x1.to(torch.float64))
                if config["reward_grad_clip"] > 0:  # a few samples with huge forces must not swamp the batch
                    norms = grad_r.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    grad_r = grad_r * (config["reward_grad_clip"] / norms).clamp(max=1.0)
                valid = out.valid.to(torch.bool)
                r = torch.where(valid, out.rewards.to(torch.float64), torch.zeros_like(out.rewards, dtype=torch.float64))
                scale = _objective_terms(r, objective)
                scale = torch.where(valid, scale, torch.zeros_like(scale))
                stash["reward"] = r.cpu().numpy()
                stash["valid"] = valid.cpu().numpy()
                stash["active"] = (scale != 0).cpu().numpy() & stash["valid"]
                return (scale[:, None] * grad_r).to(x1.dtype), valid

            x0 = torch.randn(local_batch, config["dim"], generator=gen, device=device)
            loss, _ = adjoint_matching_step(
                model,
                base,
                x0,
                reward_grad_fn,
                kl_weight=objective["kl_weight"],
                steps=config["sde_steps"],
                late_fraction=config["late_fraction"],
                n_early=config["n_early"],
                generator=gen,
            )
            batch_stats = _batch_metrics(stash["reward"], stash["valid"], stash["active"])
        else:
            idx = torch.multinomial(bank_w, local_batch, replacement=True, generator=torch.Generator().manual_seed(
                config["seed"] * 100_003 + step * 1009 + rank))
            loss = flow_matching_loss(model, bank_x[idx.to(device)], generator=gen)
            batch_stats = [float(local_batch), float(local_batch), 0.0, 0.0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        opt.step()
        sums += np.array([float(loss.detach())] + batch_stats)
        if step % config["log_every"] == 0 or step == config["steps"]:
            totals = torch.tensor(sums, dtype=torch.float64)
            if world > 1:
                dist.all_reduce(totals)
            loss_sum, n, n_valid, reward_sum, n_active = totals.tolist()
            steps_in_window = (step - 1) % config["log_every"] + 1
            metrics = {
                "step": step,
                "loss": loss_sum / (steps_in_window * world),
                "valid_fraction": n_valid / max(n, 1),
                "invalid_count": n - n_valid,
            }
            if solver == "adjoint":
                metrics["mean_reward"] = reward_sum / max(n_valid, 1)
                metrics["active_fraction"] = n_active / max(n_valid, 1)
            sums[:] = 0
            save = step % config["checkpoint_every"] == 0 or step == config["steps"]
            if rank == 0:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step")
                # sys.stdout directly: Train's patched print() would echo the line twice
                sys.stdout.write(f"[finetune] step {step}/{config['steps']}: {shown}\n")
                sys.stdout.flush()
            if tracker is not None:
                tracker.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
            if save and rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
                    torch.save({"model": state, "optimizer": opt.state_dict(), "step": step}, os.path.join(tmp, "state.pt"))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)


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
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Run the TorchTrainer; rerunning with the same ``(storage_path, name)`` resumes its checkpoints.

    ``init_state`` warm-starts the fine-tuned network (threshold refinement); the base stays the base.
    ``steps`` overrides ``finetune.steps``. ``callbacks`` go to the trainer's ``RunConfig`` (e.g. a Tune
    trial's ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop_config = {
        "model_config": model_config,
        "base_state": base_state,
        "init_state": init_state,
        "objective": objective,
        "solver": solver,
        "reward_target": reward_target,
        "reward_kwargs": dict(reward_kwargs),
        "seed": seed,
        "dim": int(model_config["dim"]),
        "steps": finetune.steps if steps is None else steps,
        "batch_size": finetune.batch_size,
        "lr": finetune.lr,
        "sde_steps": finetune.sde_steps,
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
    }
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
            failure_config=FailureConfig(max_failures=finetune.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Train's INFO lines repeat every report, and without the dashboard its placement-group
            # cleaner warns every few seconds that the state API is down; rank 0 prints progress instead.
            logging_config=LoggingConfig(log_level="ERROR"),
            callbacks=callbacks,
        ),
    )
    log(
        f"[finetune] solver={solver}, {finetune.num_workers} workers, {loop_config['steps']} steps, "
        f"global batch {finetune.batch_size}"
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
    return FinetuneResult(blob["model"], history, solver, result.checkpoint.path)
