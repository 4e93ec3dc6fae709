"""MLflow for sweeps: runs that retry their writes, and runs reused by a restarted sweep."""

from __future__ import annotations

from typing import Any, Callable

from pipelines.tracking import TrackedRun, open_run, retry_store_write

__all__ = ["RetryingRun", "open_or_reuse"]


class RetryingRun(TrackedRun):
    """A TrackedRun whose writes retry: concurrent trials share one SQLite store, and SQLite can answer
    'database is locked' at once (without waiting) when two transactions upgrade to writing together."""

    def _retry(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        retry_store_write(fn, *args, **kwargs)

    def log_params(self, params: dict[str, Any]) -> None:
        self._retry(super().log_params, params)

    def log_artifact(self, path: Any) -> None:
        self._retry(super().log_artifact, path)

    def set_tag(self, key: str, value: str) -> None:
        self._retry(super().set_tag, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._retry(super().finish, status)

    def resume(self) -> None:
        """Mark a run of an interrupted sweep as running again."""
        if self.enabled:
            self._retry(self._client().update_run, self.run_id, status="RUNNING")


def open_or_reuse(
    uri: str, experiment: str, run_name: str, run_id: str | None, parent: str | None, *, enabled: bool = True
) -> RetryingRun:
    """The MLflow run ``run_id`` when it exists in this store (a restarted sweep), else a new one."""
    if not enabled:
        return RetryingRun(None, None)
    if run_id:
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).get_run(run_id)
            return RetryingRun(uri, run_id)
        except Exception:
            pass
    run = open_run(uri, experiment, run_name, parent_run_id=parent)
    return RetryingRun(run.uri, run.run_id)
