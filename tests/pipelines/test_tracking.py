"""`pipelines.tracking.MetricLogger`: foreground and background writes reach the run in order; a store that
cannot be written never stops the caller."""

from __future__ import annotations

import pickle
import warnings

import pytest

from pipelines.tracking import MetricLogger, open_run


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def test_background_writes_every_queued_window_by_close(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = open_run(uri, "e", "r")
    logger = MetricLogger(uri, run.run_id, background=True)
    copy = pickle.loads(pickle.dumps(logger))  # a job carries it to the workers: the URI, the run, the mode
    assert (copy.uri, copy.run_id, copy.background) == (uri, run.run_id, True)
    logger.start()
    for step in range(30):
        logger.log({"loss": float(step), "skipped": float("nan")}, step=step)
    assert pickle.loads(pickle.dumps(logger)).background  # a started logger pickles without its thread
    logger.close()
    assert _history(uri, run.run_id, "loss") == [(step, float(step)) for step in range(30)]
    assert _history(uri, run.run_id, "skipped") == [] and logger.dropped == 0
    MetricLogger(uri, run.run_id).log({"loss": 99.0}, step=30)  # foreground: written on return
    assert _history(uri, run.run_id, "loss")[-1] == (30, 99.0)


def test_a_store_that_cannot_be_written_drops_batches_with_one_warning() -> None:
    logger = MetricLogger("no-such-scheme://nowhere", "run", background=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            logger.log({"loss": 1.0}, step=step)  # returns at once: the writes happen on the thread
        logger.close(timeout=30)
    assert logger.dropped == 3  # the three windows
    assert sum("could not be written" in str(w.message) for w in caught) == 1
    with pytest.raises(Exception):  # the foreground mode still raises to its caller
        MetricLogger("no-such-scheme://nowhere", "run").log({"loss": 1.0}, step=0)
