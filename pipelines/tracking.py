"""MLflow tracking: a local SQLite store by default, the same absolute URI passed to every worker.

The driver opens the run (:func:`open_run`) and logs params, summary and plots; the rank-0 training
worker logs per-step metrics into the same run through :class:`MetricLogger` with the plain client API
(Ray's MLflow callbacks do not work with Train V2).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["resolve_tracking_uri", "MetricLogger", "open_run", "retry_store_write", "TrackedRun"]


def resolve_tracking_uri(uri: str) -> str:
    """An absolute tracking URI. Empty: ``sqlite:///<cwd>/mlflow.db``; relative paths become absolute."""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return f"sqlite:///{Path(path).expanduser().resolve()}"
    if "://" in uri:
        return uri
    return Path(uri).expanduser().resolve().as_uri()  # a directory: file store


class MetricLogger:
    """Logs metric dicts into an existing run; picklable (it holds only the URI and the run id)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        retry_store_write(self._client.log_batch, self.run_id, metrics=batch)


STORE_WRITE_TRIES = 8


def retry_store_write(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow store write, retrying with back-off 0.1 s * 2^k (up to ``STORE_WRITE_TRIES`` tries).

    Concurrent writers (training workers, sweep trials) share one SQLite store, and SQLite can answer
    'database is locked' at once when two transactions upgrade to writing together. The one retry policy of
    every MLflow write in the pipeline.
    """
    for attempt in range(STORE_WRITE_TRIES):
        try:
            return fn(*args, **kwargs)
        except Exception:
            if attempt == STORE_WRITE_TRIES - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    return None


class TrackedRun:
    """An open MLflow run (or a no-op when tracking is disabled)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def worker_args(self) -> dict[str, str] | None:
        return {"uri": self.uri, "run_id": self.run_id} if self.enabled else None

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        client = self._client()
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.enabled:
            MetricLogger(self.uri, self.run_id).log(metrics, step)

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        if self.enabled:
            self._client().log_artifact(self.run_id, str(path))

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._client().set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._client().set_terminated(self.run_id, status=status)


def open_run(
    uri: str, experiment: str, run_name: str, *, enabled: bool = True, parent_run_id: str | None = None
) -> TrackedRun:
    """Create (or get) ``experiment`` and start a run in it; returns a :class:`TrackedRun`."""
    if not enabled:
        return TrackedRun(None, None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    tags = {"mlflow.runName": run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=tags, run_name=run_name)
    return TrackedRun(uri, run.info.run_id)
