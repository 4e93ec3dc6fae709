"""One sweep trial, as Tune runs it: from the shared base stage to the trial's ``summary.json``, and the lines of
``DIR/trials.log`` that record what happened to every trial. With ``finetune.backend: local`` the trial runs the
fine-tuning loop in its own process (no worker group to start) and forwards each report to Tune itself
(``pipelines.train_session.forwarding_reports``)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from pipelines.run import run_from_bank
from pipelines.schema import Config
from pipelines.sweep.tracking import RetryingRun

__all__ = ["trial_main", "append_log", "one_line"]


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def append_log(out: Path, line: str) -> None:
    """One timestamped line of ``out/trials.log``."""
    with open(out / "trials.log", "a") as f:  # O_APPEND: whole short lines from concurrent trials
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def trial_main(config: dict[str, Any], *, jobs: dict[str, dict[str, Any]], bases: dict[str, Any]) -> None:
    """The Tune trainable: one trial (``config["trial"]``, its job in ``jobs``), from its group's base stage in
    ``bases`` to ``summary.json``."""
    job = jobs[config["trial"]]
    name, out, sweep_dir = job["name"], Path(job["out"]), Path(job["sweep_dir"])
    cfg: Config = job["config"]
    run = RetryingRun(job["uri"], job["run_id"])
    base = bases[job["group"]]

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    started = time.time()
    append_log(sweep_dir, f"started {name}")
    run.resume()
    try:
        with _reporting_to_tune(cfg):
            summary = run_from_bank(cfg, out, base, run=run, plan=job["plan"], log=log,
                                    finetune_callbacks=_tune_callbacks(cfg))
        summary["wall_seconds"] = time.time() - started
        summary["sweep"] = {"trial": name, "params": job["params"], "resources": job["resources"]}
        # summary.json marks the trial done: it appears only once MLflow holds everything.
        pending = out / ".pending" / "summary.json"
        pending.parent.mkdir(exist_ok=True)
        pending.write_text(json.dumps(summary, indent=2))
        run.log_artifact(pending)
        run.finish()
        pending.replace(out / "summary.json")
    except Exception as exc:  # a stop by the scheduler or an interrupt is not a failure
        append_log(sweep_dir, f"failed {name}: {one_line(exc)}")
        run.finish("FAILED")
        raise
    append_log(sweep_dir, f"finished {name} in {summary['wall_seconds']:.0f}s")


def _tune_callbacks(cfg: Config) -> list[Any]:
    """The fine-tuning callbacks of a trial: Ray Train's reports become this Tune trial's results (what ASHA
    schedules on). None with the local backend, whose loop reports from this process (:func:`_reporting_to_tune`)."""
    if cfg.finetune.backend == "local":
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def _reporting_to_tune(cfg: Config) -> Any:
    """A context in which the local backend's reports (in this trial's process) go to ``ray.tune.report``."""
    if cfg.finetune.backend != "local":
        return contextlib.nullcontext()
    from ray import tune

    from pipelines.train_session import forwarding_reports

    return forwarding_reports(tune.report)
