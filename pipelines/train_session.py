"""What the fine-tuning loop needs from where it runs: a small session object.

`pipelines.finetune.run_loop` talks only to a session: its world rank and size, its device, the latest
checkpoint to resume from, ``prepare_model`` (DDP or nothing) and ``report(metrics, checkpoint_dir)``.

* :class:`RayTrainSession`: inside a Ray Train worker (exactly the ``ray.train`` calls: context, device,
  ``get_checkpoint``, ``prepare_model``, ``report`` with a ``Checkpoint.from_directory``).
* :class:`LocalSession`: the loop in the calling process, world size 1 (``finetune.backend: local``). A report
  with a checkpoint copies the directory to ``run_dir/checkpoint_NNNNNN`` (NNNNNN counts up over every run in
  that directory; a temporary name renamed into place, so a kill never leaves half a checkpoint), keeps the
  newest ``num_to_keep`` (as Ray Train's ``CheckpointConfig(num_to_keep=2)``) and a rerun in the same
  ``run_dir`` resumes from the newest. Each checkpoint also holds its report's metrics (``metrics.json``).
  Inside :func:`forwarding_reports` every report's metrics also go to the given listener, after the checkpoint is
  in place (a sweep trial forwards them to its Tune trial, as Ray Train's ``TuneReportCallback`` does).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

__all__ = ["quiet_train_logs", "TrainSession", "RayTrainSession", "LocalSession", "local_checkpoints", "forwarding_reports"]

_CHECKPOINT = re.compile(r"^checkpoint_(\d{6})$")
METRICS_FILE = "metrics.json"
# Listeners of this process's local reports (forwarding_reports); a process runs one local loop at a time.
_LISTENERS: list[Callable[[dict[str, Any]], None]] = []


def quiet_train_logs() -> None:
    """Ray Train's per-report INFO lines off (rank 0 prints its own progress line)."""
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this module names its logger by file path ("Reporting training result ..." on every report)
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: only the noise stays
        pass


@contextlib.contextmanager
def forwarding_reports(listener: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """While inside, every :class:`LocalSession` report of this process also calls ``listener(metrics)`` (a copy
    of the reported metrics), once the report's checkpoint is in place.

    The local loop runs in the caller's process, so a sweep trial (a Tune function trainable, one process per
    trial) forwards its loop's reports to Tune with ``forwarding_reports(ray.tune.report)``."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


class TrainSession(Protocol):
    """The loop's view of its worker group."""

    world_rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A context yielding the directory of the checkpoint to resume from (None: start fresh)."""

    def prepare_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        """The model to train: DDP-wrapped (with ``ddp_kwargs``) when the world has more than one worker."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report one window's metrics, with the checkpoint written to ``checkpoint_dir`` (copied: the caller
        may delete it afterwards)."""


class RayTrainSession:
    """Inside a Ray Train worker: ``ray.train``'s context, device, checkpoint, ``prepare_model`` and ``report``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as ckpt_dir:
            yield ckpt_dir

    def prepare_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def local_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete local checkpoints in ``run_dir``, oldest first (by their number)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


class LocalSession:
    """The loop in this process: rank 0 of 1, no DDP, checkpoints under ``run_dir`` (module docstring)."""

    world_rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, device: torch.device, num_to_keep: int = 2) -> None:
        self.run_dir, self.device, self.num_to_keep = Path(run_dir), torch.device(device), int(num_to_keep)
        self.history: list[dict[str, Any]] = []  # every report of this run, in order

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        kept = local_checkpoints(self.run_dir)
        yield str(kept[-1]) if kept else None

    def prepare_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        # Ray Train's prepare_model with one worker only moves the model to the device: no DDP wrapper.
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is not None:
            self._keep(metrics, checkpoint_dir)
        for listener in list(_LISTENERS):
            listener(dict(metrics))

    def _keep(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        """Copy ``checkpoint_dir`` in as the next numbered checkpoint; drop all but the newest ``num_to_keep``."""
        kept = local_checkpoints(self.run_dir)
        number = int(_CHECKPOINT.match(kept[-1].name).group(1)) + 1 if kept else 1  # type: ignore[union-attr]
        final = self.run_dir / f"checkpoint_{number:06d}"
        partial = self.run_dir / f".partial_{final.name}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(checkpoint_dir, partial)
        (partial / METRICS_FILE).write_text(json.dumps(metrics))
        partial.rename(final)  # complete, or absent
        for old in local_checkpoints(self.run_dir)[:-self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    def kept_metrics(self) -> list[dict[str, Any]]:
        """The metrics of the kept checkpoints, oldest first (what Ray Train's ``metrics_dataframe`` holds)."""
        return [json.loads((p / METRICS_FILE).read_text()) for p in local_checkpoints(self.run_dir)]
