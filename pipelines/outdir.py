"""Output directories: the guard that lets a rerun resume only a run of the same config (run, sweep, trial),
and a sweep trial's status as its directory records it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipelines.config import ConfigError, flatten, to_flat_dict
from pipelines.schema import Config

__all__ = ["claim_output_dir", "config_differences", "trial_status"]


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
        changed = config_differences(path.read_text(), config_text)
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ConfigError(
                f"'--out {directory}' holds {what} with a different config.yaml (differs in {shown}); choose a new "
                "--out to start over"
            )
    path.write_text(config_text)


def config_differences(old_text: str, new_text: str) -> list[str]:
    """Dotted keys whose values differ between two ``config.yaml`` texts, sorted.

    A key only in the new text (added to the schema since the old run) counts only when its value is not the
    schema default, so a run made before a new key existed still resumes when that key keeps its default; a key
    only in the old text (removed from the schema) does not count.
    """
    def flat(text: str) -> dict[str, Any]:
        return flatten(OmegaConf.to_container(OmegaConf.create(text), resolve=False))

    old, new, default = flat(old_text), flat(new_text), to_flat_dict(Config())

    def differs(key: str, value: Any) -> bool:
        if key in old:
            return old[key] != value
        return key not in default or default[key] != value  # added since: counts only off its default

    return sorted(k for k, v in new.items() if differs(k, v))


def trial_status(trial_dir: Path) -> str:
    """A sweep trial's status: "done" once its ``summary.json`` exists, else what ``status.json`` says
    (e.g. "stopped" by the scheduler, "failed"), else "not run"."""
    if (trial_dir / "summary.json").is_file():
        return "done"
    marker = trial_dir / "status.json"
    return json.loads(marker.read_text())["status"] if marker.is_file() else "not run"
