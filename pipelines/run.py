"""``tfft run``: config -> base model -> base bank -> threshold -> fine-tune -> evaluate -> record.

Each stage is a module of `pipelines.stages` returning a frozen result; this module only chains them, with
the output directory's guard and the MLflow run around them. Every stage leaves its result in the output
directory, and a rerun with the same ``--out`` reuses what is there: bank shards, the fine-tuning checkpoints,
the final bank. ``summary.json["stages"]`` records what each stage did in this call
(`pipelines.stage_record`), ``summary.json["warnings"]`` the config's warnings
(`pipelines.stages.preflight.sampler_warnings`).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipelines.bankio import Bank
from pipelines.config import to_flat_dict, to_yaml
from pipelines.models import model_record
from pipelines.outdir import claim_output_dir
from pipelines.pretrain import load_or_pretrain
from pipelines.raysession import check_address
from pipelines.schema import Config
from pipelines.stage_record import BUILT, StageRecord
from pipelines.stages.base import BaseStage, prepare_base, served_reward
from pipelines.stages.evaluate import EvaluateStage, evaluate
from pipelines.stages.preflight import RunPlan, preflight
from pipelines.stages.record import record_summary
from pipelines.stages.threshold import solve_objective
from pipelines.stages.train import TrainStage, train
from pipelines.summary import format_table
from pipelines.tracking import TrackedRun, open_run, resolve_tracking_uri

__all__ = ["run_pipeline", "run_bank_only", "run_from_bank", "stages_record"]


def run_pipeline(
    cfg: Config,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
    finetune_callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run every stage; returns the summary dict (also written to ``out/summary.json``).

    ``finetune_callbacks`` go to every fine-tuning TorchTrainer's ``RunConfig`` (e.g. Tune's
    ``TuneReportCallback``, so that a trial's training reports become its Tune results).
    """
    out = Path(out).resolve()
    plan = preflight(cfg, log=log)  # config problems surface before Ray starts
    claim_output_dir(out, to_yaml(cfg), "a run")
    started = time.time()
    model = load_or_pretrain(cfg, log=log)  # a bad data source fails here, before MLflow or Ray
    run = _open_run(cfg, out.name, log)
    with _failing(run), served_reward(cfg, log) as served:
        base = prepare_base(served, out, log=log, model=model)
        summary = run_from_bank(served, out, base, run=run, plan=plan, log=log,
                                finetune_callbacks=finetune_callbacks)
    summary["wall_seconds"] = time.time() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    run.log_artifact(out / "summary.json")
    run.finish()
    log(format_table(summary))
    return summary


def run_from_bank(
    cfg: Config,
    out: Path,
    base: BaseStage,
    *,
    run: TrackedRun,
    plan: RunPlan,
    log: Callable[[str], None] = print,
    finetune_callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Threshold -> fine-tune -> evaluate -> record, from an existing base stage, into ``out``.

    Each stage's result in ``out`` (``checkpoint/model.pt``, ``bank_final.parquet``) is reused on a rerun.
    ``plan``: what preflight resolved (the solver). ``finetune_callbacks``: see `run_pipeline`.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    threshold = solve_objective(cfg, base.bank, run=run, log=log)
    solved = StageRecord(BUILT, time.time() - started, {"samples": len(base.bank), "valid": base.bank.n_valid})
    trained = train(cfg, out, base, threshold, plan=plan, run=run, log=log, callbacks=finetune_callbacks)
    final = evaluate(cfg, out, base, trained, log=log)
    summary = record_summary(cfg, out, run, base.bank, final.bank, threshold.threshold, trained.tilt, plan.solver,
                             model_dir=trained.model_dir)
    summary["model"] = model_record(base.model.config, cfg.model.checkpoint)  # banks hold samples flattened
    if trained.refinement is not None:
        summary["refinement"] = trained.refinement
    summary["stages"] = stages_record(base, solved, trained, final)
    summary["warnings"] = [warning.to_dict() for warning in plan.warnings]
    return summary


def stages_record(base: BaseStage, threshold: StageRecord, trained: TrainStage,
                  final: EvaluateStage) -> dict[str, dict[str, Any]]:
    """``summary.json["stages"]``: ``pretrain`` (when the base model is pretrained), ``bank_base``,
    ``threshold`` (solved every call), ``finetune`` and ``bank_final``, each a `StageRecord`'s dict."""
    return _stage_dicts({"pretrain": base.model.stage, "bank_base": base.record, "threshold": threshold,
                         "finetune": trained.record, "bank_final": final.record})


def _stage_dicts(records: dict[str, StageRecord | None]) -> dict[str, dict[str, Any]]:
    """Each stage's `StageRecord` as its dict, leaving out the stages that did not run (None)."""
    return {name: record.to_dict() for name, record in records.items() if record is not None}


def run_bank_only(cfg: Config, out: str | Path, *, log: Callable[[str], None] = print) -> Bank:
    """``tfft bank``: the base model and ``out/bank_base.parquet``; prints the bank's accounting and writes
    ``out/bank_summary.json``: ``stages`` (``pretrain`` when pretrained, ``bank_base``: what this call built,
    reused or resumed, as in ``summary.json["stages"]``), ``accounting`` (the bank's valid and invalid counts
    by reason) and ``wall_seconds``."""
    out = Path(out).resolve()
    check_address(cfg.ray)
    claim_output_dir(out, to_yaml(cfg), "a run")
    started = time.time()
    with served_reward(cfg, log) as served:
        base = prepare_base(served, out, log=log)
    accounting = base.bank.accounting()
    record = {"stages": _stage_dicts({"pretrain": base.model.stage, "bank_base": base.record}),
              "accounting": accounting, "wall_seconds": time.time() - started}
    (out / "bank_summary.json").write_text(json.dumps(record, indent=2))
    log("[bank base] " + ", ".join(f"{k} {v}" for k, v in accounting.items()))
    return base.bank


def _open_run(cfg: Config, name: str, log: Callable[[str], None]) -> TrackedRun:
    """The run's MLflow run (``tracking``; a no-op one when disabled), with the flat config as its params."""
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    run = open_run(tracking_uri, cfg.tracking.experiment, name, enabled=cfg.tracking.enabled)
    run.log_params(to_flat_dict(cfg))
    if run.enabled:
        log(f"[mlflow] run {run.run_id} in {tracking_uri}")
    return run


@contextmanager
def _failing(run: TrackedRun) -> Iterator[None]:
    """Marks ``run`` FAILED when the block raises (an interrupt included), and re-raises."""
    try:
        yield
    except BaseException:
        run.finish("FAILED")
        raise
