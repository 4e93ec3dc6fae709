"""MLflow tracking: a local SQLite store by default, the same absolute URI passed to every worker.

The driver opens the run (:func:`open_run`) and logs params, summary and plots; the rank-0 training
worker logs per-step metrics into the same run through :class:`MetricLogger` with the plain client API
(Ray's MLflow callbacks do not work with Train V2).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
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
    """Logs metric dicts into an existing run; picklable (it holds only the URI, the run id and the mode).

    ``background=False``: each :meth:`log` writes before it returns (with :func:`retry_store_write`'s retries).
    ``background=True`` (the training loop's rank 0): :meth:`log` only queues the metrics, and one daemon thread
    imports MLflow, opens the client and writes the queue in order, so that neither the import (about a second
    in a fresh worker process) nor a store's latency (SQLite's lock, a remote server's round trip) stalls the
    training step, which holds every DDP worker at its next all-reduce. :meth:`close` waits for the queue (up to
    ``timeout`` seconds). A write that still fails after the retries is dropped with one warning and the thread
    goes on: tracking never stops a training run.
    """

    def __init__(self, uri: str, run_id: str, *, background: bool = False):
        self.uri, self.run_id, self.background = uri, run_id, background
        self._client: Any = None
        self._queue: queue.Queue[list[tuple[str, float, int, int]] | None] | None = None
        self._thread: threading.Thread | None = None
        self.dropped = 0  # metric batches whose write failed (background)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "background": self.background}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["run_id"], background=state.get("background", False))  # type: ignore[misc]

    def start(self) -> None:
        """Start the background thread now (it imports MLflow and opens the client before the first metrics
        arrive); a no-op when writing in the foreground or already started."""
        if self.background and self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, args=(self._queue,), name="tfft-mlflow", daemon=True)
            self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [(key, float(value), now, step) for key, value in metrics.items()
                if value is not None and math.isfinite(float(value))]
        if not self.background:
            self._write(rows)
            return
        self.start()
        assert self._queue is not None
        self._queue.put(rows)

    def close(self, timeout: float = 60.0) -> None:
        """Wait (up to ``timeout`` s) until every queued batch is written, then stop the thread."""
        if self._thread is None or self._queue is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            warnings.warn(f"MLflow: metrics still queued after {timeout:g} s were not written", stacklevel=2)
        self._thread, self._queue = None, None

    def _write(self, rows: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        if rows:
            retry_store_write(self._client.log_batch, self.run_id, metrics=[Metric(*row) for row in rows])

    def _drain(self, work: queue.Queue[list[tuple[str, float, int, int]] | None]) -> None:
        """The background thread: open the client, then write the batches of ``work`` in order until ``None``."""
        try:
            self._write([])  # the import and the client, before the first metrics arrive
        except Exception:  # noqa: BLE001 - the first batch's write opens it again and reports the failure
            pass
        while (rows := work.get()) is not None:
            try:
                self._write(rows)
            except Exception as error:  # noqa: BLE001 - tracking must not stop training
                self.dropped += 1
                if self.dropped == 1:
                    warnings.warn(f"MLflow: a metrics batch could not be written and was dropped ({error!r}); "
                                  "training goes on", stacklevel=1)


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
