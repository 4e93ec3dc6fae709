"""Output directories: the guard that lets a rerun resume only a run of the same config (run, sweep, trial),
and a sweep trial's status as its directory records it."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import ConfigError

__all__ = ["claim_output_dir", "trial_status"]


def claim_output_dir(directory: Path, config_text: str, what: str = "a run") -> None:
    """Create ``directory`` (or accept it) and record ``config_text`` as its ``config.yaml``.

    Raises `ConfigError` when the path is a file, cannot be created, or already holds ``config.yaml`` with a
    different config (a rerun must not mix two experiments' stages); the same config resumes.
    """
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"'--out {directory}' is a file; --out names a directory (new or of a previous run)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"'--out {directory}' cannot be created: {exc.strerror or exc}") from exc
    path = directory / "config.yaml"
    if path.is_file() and path.read_text() != config_text:
        raise ConfigError(
            f"'--out {directory}' holds {what} with a different config.yaml; choose a new --out to start over"
        )
    path.write_text(config_text)


def trial_status(trial_dir: Path) -> str:
    """A sweep trial's status: "done" once its ``summary.json`` exists, else what ``status.json`` says
    (e.g. "stopped" by the scheduler, "failed"), else "not run"."""
    if (trial_dir / "summary.json").is_file():
        return "done"
    marker = trial_dir / "status.json"
    return json.loads(marker.read_text())["status"] if marker.is_file() else "not run"
