"""The fine-tuning stage: one fine-tuning run on the pseudo-reward into ``out/checkpoint/model.pt`` (reused
when a previous run finished it), then threshold refinement's rounds when ``threshold.refine_rounds`` is set.

The run itself is `pipelines.trainer.run_finetune` (Ray Train, or the local loop), at the threshold stage's
`tfft.objective.Tilt` and the solver that preflight resolved (`pipelines.stages.preflight.RunPlan`). This stage
supplies what it reads from the base bank: the weighted solver's frozen tilt weights (DESIGN §7), the guard's
baseline E_q[g] and its validity floor. With ``finetune.lora`` the checkpoint directory also gets the adapter
(``save_pretrained``) and, with ``merge``, ``merged.safetensors``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipelines import cond_record
from pipelines.bankio import Bank
from pipelines.conditions import conditions_of
from pipelines.finetune_job import FinetuneJob, WeightedBank
from pipelines.lora import lora_settings, read_adapter, save_lora_checkpoint
from pipelines.refinement import FineTune, final_round_dir, refine_threshold
from pipelines.schema import Config
from pipelines.stage_record import BUILT, RESUMED, REUSED, StageRecord, combined_status
from pipelines.stages.base import BaseStage
from pipelines.stages.preflight import RunPlan, training_steps
from pipelines.stages.threshold import ThresholdStage
from pipelines.tracking import TrackedRun
from pipelines.trainer import FinetuneResult, run_finetune
from tfft.invalid import tilt_rewards
from tfft.objective import Tilt
from tfft.target import effective_sample_size

__all__ = ["TrainStage", "CachedFinetune", "train", "checkpoint_record"]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainStage:
    """The fine-tuned network's state, the objective it was fine-tuned for (refinement's eta when refined),
    what the stage did (``record``: :func:`train`), refinement's rounds (None without refinement) and the
    directory whose ``checkpoint/model.pt`` holds the state (None: the run's own; refinement's last round)."""

    state: State
    tilt: Tilt
    record: StageRecord
    refinement: list[dict[str, Any]] | None = None
    model_dir: Path | None = None


def train(
    cfg: Config, out: Path, base: BaseStage, threshold: ThresholdStage, *, plan: RunPlan, run: TrackedRun,
    log: Callable[[str], None] = print, callbacks: Sequence[Any] = (),
) -> TrainStage:
    """Fine-tune at ``threshold.tilt`` with ``plan.solver`` into ``out``; then refine the threshold
    (``threshold.refine_rounds``, `pipelines.refinement`) when there is one eta* to refine. ``callbacks``: see
    `pipelines.run.run_pipeline`.

    The stage's record covers every fine-tuning run (refinement's rounds and their banks included): ``runs``,
    ``steps_run`` (trained in this call) and ``steps_reused`` (from ``checkpoint/model.pt`` or a training
    checkpoint stored by an earlier call), summed over the runs."""
    started = time.time()
    finetune = CachedFinetune(cfg, base, plan, run, log, tuple(callbacks))
    state, first = finetune(out, threshold.tilt)
    runs = [first]
    if not cfg.threshold.refine_rounds or threshold.threshold is None:
        return TrainStage(state, threshold.tilt, _stage_record(runs, started))
    state, tilt, rounds = refine_threshold(
        cfg, out, base.model, base.bank, threshold.tilt, state, run=run, log=log,
        finetune=_warm_rounds(cfg, out, finetune, runs),
    )
    return TrainStage(state, tilt, _stage_record(runs, started), rounds, final_round_dir(out, rounds))


def _stage_record(runs: list[StageRecord], started: float) -> StageRecord:
    """The fine-tuning stage's record from its runs' (`pipelines.stage_record.combined_status`)."""
    counts = {"runs": len(runs), "steps_run": sum(r.counts["steps_run"] for r in runs),
              "steps_reused": sum(r.counts["steps_reused"] for r in runs)}
    return StageRecord(combined_status([r.status for r in runs]), time.time() - started, counts)


def _warm_rounds(cfg: Config, out: Path, finetune: CachedFinetune, runs: list[StageRecord]) -> FineTune:
    """Refinement's fine-tuning: each round warm-started from the previous round's state and, with LoRA, from
    the adapter in the previous round's checkpoint (the first round's predecessor is ``out``); each round's
    record is appended to ``runs``."""
    previous = out

    def finetune_round(out_k: Path, tilt_k: Tilt, init: State) -> State:
        nonlocal previous
        adapter = read_adapter(previous / "checkpoint") if cfg.finetune.lora.enabled else None
        state, record = finetune(out_k, tilt_k, init_state=init, init_adapter=adapter,
                                 steps=cfg.threshold.refine_steps or None)
        runs.append(record)
        previous = out_k
        return state

    return finetune_round


@dataclass(frozen=True)
class CachedFinetune:
    """Fine-tunes the base stage's model into ``<out>/checkpoint/model.pt``, or loads that file when a previous
    run finished it; returns the state (with LoRA the merged network) and the run's record: reused (the file),
    resumed (from a training checkpoint of an earlier call) or built, with ``steps_run`` and ``steps_reused``."""

    cfg: Config
    base: BaseStage
    plan: RunPlan
    run: TrackedRun
    log: Callable[[str], None]
    callbacks: tuple[Any, ...] = ()

    def __call__(self, out: Path, tilt: Tilt, *, init_state: State | None = None,
                 init_adapter: State | None = None, steps: int | None = None) -> tuple[State, StageRecord]:
        """``init_state``/``init_adapter`` warm-start the network/the LoRA adapter; ``steps`` overrides
        ``finetune.steps``."""
        model_path = out / "checkpoint" / "model.pt"
        called = time.time()
        if model_path.is_file():
            self.log(f"[finetune] reusing {model_path}")
            blob = torch.load(model_path, map_location="cpu", weights_only=True)
            trained = int(blob.get("steps", self.cfg.finetune.steps if steps is None else steps))  # older files
            record = StageRecord(REUSED, time.time() - called, {"steps_run": 0, "steps_reused": trained})
            return blob["state_dict"], record
        started = time.time()
        result = run_finetune(self.job(tilt, init_state=init_state, init_adapter=init_adapter, steps=steps),
                              name="finetune", storage_path=_train_storage(self.cfg, out),
                              callbacks=list(self.callbacks) or None, log=self.log)
        seconds = time.time() - started
        self.log(f"[finetune] done in {seconds:.0f}s")
        self._save(model_path, tilt, result, seconds)
        counts = {"steps_run": result.steps - result.reused_steps, "steps_reused": result.reused_steps}
        status = RESUMED if result.reused_steps else BUILT
        return result.state_dict, StageRecord(status, time.time() - called, counts)

    def job(self, tilt: Tilt, *, init_state: State | None = None, init_adapter: State | None = None,
            steps: int | None = None) -> FinetuneJob:
        """The run's `pipelines.finetune_job.FinetuneJob`: the config's ``finetune`` section, the objective ``tilt``,
        and from the base bank the weighted solver's rows (``RunPlan.solver`` weighted) and the guard's inputs."""
        cfg, model, bank = self.cfg, self.base.model, self.base.bank
        weighted = _weighted_inputs(cfg, bank, tilt, self.log) if self.plan.solver == "weighted" else None
        lora = lora_settings(cfg.finetune.lora)
        conditions = conditions_of(cfg)
        return FinetuneJob(
            cfg.finetune, model.config, model.state_dict, tilt, cfg.reward.target, dict(cfg.reward.kwargs), cfg.seed,
            steps=cfg.finetune.steps if steps is None else steps, sde_steps=training_steps(cfg), weighted=weighted,
            conditions=tuple(conditions) or None, init_state=None if lora is not None else init_state, lora=lora,
            init_adapter=init_adapter, mlflow=self.run.worker_args(),
            **_guard_inputs(cfg, bank, tilt))

    def _save(self, model_path: Path, tilt: Tilt, result: FinetuneResult, seconds: float) -> None:
        """``model.pt``: the state with the solver, objective (``Tilt.to_dict``), steps trained, timings and the
        guard's decision; with LoRA the adapter files first (``model.pt`` marks the stage done)."""
        model_path.parent.mkdir(parents=True, exist_ok=True)
        guard = {"kept": result.kept, "reason": result.kept_reason, "stopped_early": result.stopped_early}
        blob = {"config": self.base.model.config, "state_dict": result.state_dict, "solver": result.solver,
                "objective": tilt.to_dict(), "seconds": seconds, "loop_seconds": result.loop_seconds, "guard": guard,
                "steps": result.steps}
        if result.lora is not None:
            save_lora_checkpoint(model_path.parent, result.lora, merge=self.cfg.finetune.lora.merge)
            blob["lora"] = result.lora_record
            _log_lora(self.run, result.lora_record)
        tmp = model_path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(model_path)


def _weighted_inputs(cfg: Config, bank: Bank, tilt: Tilt, log: Callable[[str], None]) -> WeightedBank:
    """The weighted solver's bank rows, their frozen tilt weights w_i ∝ exp(g(x_i)/gamma) and, with conditions,
    their condition indices."""
    if conditions_of(cfg):  # per condition, each condition's weights summing to 1/C
        weights, rows = cond_record.tilt_by_condition(bank, tilt, cfg.objective.invalid_reward)
        log(f"[finetune] weighted flow matching on {int(rows.sum())} bank samples of {len(conditions_of(cfg))} "
            f"conditions, ESS of the frozen weights {effective_sample_size(weights[rows]):.0f}")
        return WeightedBank(bank.x[rows], weights[rows], bank.cond[rows])
    # failures at the invalid reward, or neutral (tfft.invalid.tilt_rewards); rows with a finite x
    reward, rows = tilt_rewards(bank.reward, bank.valid, cfg.objective.invalid_reward, tilt.eta)
    rows = rows & np.isfinite(bank.x).all(axis=1)
    weights = tilt.weights(np.where(rows, reward, np.nan), rows)
    log(f"[finetune] weighted flow matching on {int(rows.sum())} bank samples, "
        f"ESS of the frozen weights {effective_sample_size(weights):.0f}")
    return WeightedBank(bank.x[rows], weights[rows])


def _guard_inputs(cfg: Config, bank: Bank, tilt: Tilt) -> dict[str, float]:
    """The guard's baseline, the base model's objective E_q[g] on the bank's valid samples (its KL is 0), and
    its validity floor for the training samples: the bank's valid fraction less ``finetune.guard_validity_drop``."""
    if conditions_of(cfg):
        baseline = cond_record.base_objective(bank, tilt)
    else:
        g = tilt.pseudo_reward(bank.reward[bank.valid])
        baseline = float(g.mean()) if g.size else float("nan")
    floor = max(bank.n_valid / max(len(bank.valid), 1) - cfg.finetune.guard_validity_drop, 0.0)
    return {"guard_baseline": baseline, "min_valid_fraction": floor}


def _log_lora(run: TrackedRun, record: dict[str, Any]) -> None:
    """MLflow params of the LoRA run (the config's ``finetune.lora.*`` are logged with the config)."""
    run.log_params({"lora.target_modules": ",".join(record["target_modules"]),
                    "lora.trainable_parameters": record["trainable"], "lora.total_parameters": record["total"]})
    if "peak_memory_bytes" in record:
        run.log_metrics({"lora.peak_memory_bytes": float(record["peak_memory_bytes"])})


def checkpoint_record(out: Path) -> dict[str, Any]:
    """What the fine-tuning stage recorded with its checkpoint: wall time, loop time, the guard's decision and
    the LoRA record ({} when ``out`` has no checkpoint)."""
    path = out / "checkpoint" / "model.pt"
    if not path.is_file():
        return {}
    blob = torch.load(path, map_location="cpu", weights_only=True)
    seconds, loop = blob.get("seconds"), blob.get("loop_seconds")
    return {"seconds": None if seconds is None else float(seconds), "guard": blob.get("guard"),
            "loop_seconds": None if loop is None else float(loop), "lora": blob.get("lora")}


def _train_storage(cfg: Config, out: Path) -> str:
    """Where the fine-tuning checkpoints go: ``out/train``, or with ``--out`` on an object store and Ray Train's
    worker group (whose workers may run on other nodes) that directory on the store itself."""
    from pipelines.mirror import remote_of

    remote = remote_of(out) if cfg.finetune.backend == "ray" else None
    return f"{remote}/train" if remote else str(out / "train")
