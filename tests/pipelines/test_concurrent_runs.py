"""Two ``tfft run``s started together on one machine: each starts its own local Ray, neither disturbs the other.

Before the fix, Ray Train's placement-group cleaner of one run looked its cluster up by address, found both
local Rays and picked the latest: "Found multiple active Ray instances" and a traceback in the log
(`pipelines.raysession.connect` now fixes each local Ray's GCS port and tells its workers the address).

The check: a run alone, then two runs of the same config started together; all three summaries are the same, and
the logs of the pair carry no error line from Ray. Tiny sizes: what is tested is the start-up and the stages,
not the fine-tuning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
TINY = ["bank.size=500", "eval.size=500", "finetune.steps=4", "sampler.steps=5", "pretrain.steps=100",
        "finetune.num_workers=1", "finetune.log_every=2", "finetune.checkpoint_every=2"]
# Lines that mean Ray or a stage went wrong: Ray's error-level log lines ("[2026-01-01 10:00:00,123 E 4242 4243]"),
# tracebacks, ERROR-level Python logging, the multiple-instances message.
BAD = re.compile(r"Found multiple active Ray instances|Traceback|\bERROR\b|,\d{3} E \d+ \d+\]")
# Two Ray faults that are not about sharing a machine, seen in runs alone too, are left out; any other error
# line fails the test:
# - every run logs one error-level line: an actor pool whose actors take their constructor arguments (the model's
#   weights) from the object store may not restart if those are lost (a warning about a possibility);
# - now and then a Ray Data conversion task (``ndarray_to_block``) aborts in Ray's own code ("Mutex corrupt",
#   SIGABRT) after its work is done; Ray retries it and the run's results are unchanged.
BENIGN = re.compile(r"has constructor arguments in the object store and max_restarts > 0|\(ndarray_to_block pid=")
COMPARED = ("threshold", "base", "finetuned", "target")


def _start(out: Path, root: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "tune_configs/toy2d_right.yaml"), "--out",
            str(out), *TINY, f"pretrain.cache_dir={root / 'pretrain'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    log = open(out.with_suffix(".log"), "wb")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, out: Path) -> tuple[dict, str]:
    code = proc.wait(timeout=600)
    text = out.with_suffix(".log").read_text(errors="replace")
    assert code == 0, f"{out.name} exited with {code}:\n{text[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    return {key: summary[key] for key in COMPARED}, text


def test_two_runs_together_match_a_run_alone(tmp_path):
    alone, _ = _finish(_start(tmp_path / "alone", tmp_path), tmp_path / "alone")  # also fills the pretrain cache
    pair = [tmp_path / "first", tmp_path / "second"]
    procs = [_start(out, tmp_path) for out in pair]
    for proc, out in zip(procs, pair):
        summary, text = _finish(proc, out)
        assert summary == alone, f"{out.name} differs from the run alone"
        bad = [line for line in text.splitlines() if BAD.search(line) and not BENIGN.search(line)]
        assert not bad, f"{out.name}'s log has error lines:\n" + "\n".join(bad[:10])
