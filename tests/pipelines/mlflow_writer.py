"""A process that writes one MLflow run, as a sweep trial does: step metrics, an artifact, the end.

Its own module, light to import: each writer is a spawned process, and importing a test module (torch, Ray,
the whole pipeline) would take it longer than its writes."""

from __future__ import annotations

import faulthandler

from pipelines.sweep.tracking import RetryingRun
from pipelines.tracking import MetricLogger


def hammer(uri: str, run_id: str, artifact: str, steps: int = 40) -> None:
    """Log ``steps`` steps of metrics into run ``run_id``, then the artifact, then finish the run."""
    faulthandler.dump_traceback_later(120)  # a stuck writer leaves its stack in the test's output
    logger = MetricLogger(uri, run_id)
    run = RetryingRun(uri, run_id)
    for step in range(steps):
        logger.log({"loss": float(step), "active_fraction": 0.5}, step=step)
    run.log_artifact(artifact)
    run.finish()
