"""Multi-node runs and fault tolerance on the session's two-node loopback cluster (conftest.py).

- the docs' rehearsal (``ray job submit ... tfft run tune_configs/cluster_smoke.yaml``) runs, and its
  reward actors and training workers ran on both nodes; one of its training workers is killed mid-run;
- a reward actor and the driver of other runs are killed mid-run: each run completes with the counts of an
  uninterrupted run, and only the killed work is redone, once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines.bankio import read_bank

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
SMOKE = ROOT / "tune_configs" / "cluster_smoke.yaml"
STEP = re.compile(r"\[finetune\] step (\d+)/(\d+)")
PID = re.compile(r"pid=(\d+)")



STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_nodes
what, address = sys.argv[1], sys.argv[2]
if what == "nodes":
    rows = [{"node_id": n.node_id} for n in list_nodes(address=address) if n.state == "ALIVE"]
else:
    found = list_actors(address=address, limit=10_000, detail=True, raise_on_missing_output=False)
    rows = [{"class_name": a.class_name or "", "node_id": a.node_id, "pid": a.pid, "state": a.state,
             "actor_id": a.actor_id} for a in found]
print(json.dumps(rows))
"""


def state(cluster: dict, what: str) -> list[dict]:
    """Ray's state API, queried in a child process that carries the cluster's auth token."""
    done = subprocess.run([sys.executable, "-c", STATE_QUERY, what, cluster["dashboard"]], env=cluster["env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def actors(cluster: dict, name: str, *, alive_only: bool = False) -> list[dict]:
    """Actors of the cluster whose class name contains ``name`` (dead ones too, unless alive_only)."""
    rows = [a for a in state(cluster, "actors") if name in a["class_name"]]
    return [a for a in rows if a["state"] == "ALIVE"] if alive_only else rows


# The fault tests kill a run at a training step: the guard must not stop it early (its own tests are elsewhere).
FAULT_RUN = ("finetune.guard_patience=0",)
# The rehearsal reads the steps from `ray job submit`'s log stream, seconds behind the workers: a larger batch
# makes its 100 steps outlast that delay, so the kill lands while they run.
REHEARSAL_RUN = (*FAULT_RUN, "finetune.batch_size=512")


class Driver:
    """``tfft`` in a process group of its own; stdout is collected line by line as it arrives."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, predicate, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self):
                return
            if self.proc.poll() is not None:
                raise AssertionError("the run ended before the kill point:\n" + "".join(self.lines[-40:]))
            time.sleep(0.2)
        raise AssertionError("kill point not reached:\n" + "".join(self.lines[-40:]))

    def steps(self) -> list[int]:
        """Logged fine-tuning steps, one entry per (worker process, step). Two nodes on one machine share
        one log directory, so both nodes' log monitors forward every worker line: keep the first."""
        seen: dict[tuple[str, int], None] = {}
        for line in self.lines:
            if m := STEP.search(line):
                pid = PID.search(line)
                seen.setdefault((pid.group(1) if pid else "", int(m.group(1))), None)
        return [step for _, step in seen]

    def finish(self, timeout: float = 600) -> str:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        text = "".join(self.lines)
        assert rc == 0, text[-4000:]
        return text

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)
        self.reader.join(10)


def submit_job(line: str, env: dict[str, str], tries: int = 5) -> Driver:
    """``ray job submit`` as a `Driver`; submitted again (a few seconds later) while the head's job agent is not
    up yet, which on a loaded machine can outlast the node's start."""
    for _ in range(tries):
        run = Driver(["bash", "-c", line], env)
        deadline = time.time() + 30  # a refused submission exits within seconds
        while run.proc.poll() is None and time.time() < deadline and not run.steps():
            time.sleep(0.2)
        if run.proc.poll() is None:
            return run
        run.reader.join(10)  # the process ended: read all it wrote
        if not any("No available agent" in x for x in run.lines):
            return run
        time.sleep(5)
    raise AssertionError("the job agent never came up:\n" + "".join(run.lines[-20:]))


def tfft(cluster: dict, command: str, out: Path, *overrides: str) -> list[str]:
    shared = Path(cluster["env"]["TFFT_SHARED"])
    return [
        "tfft", command, str(SMOKE), "--out", str(out), "--address", cluster["address"],
        f"pretrain.cache_dir={shared / 'cache'}", f"bank.cache_dir={shared / 'rewards'}",
        f"tracking.uri=sqlite:///{shared / 'mlflow.db'}", *overrides,
    ]


def assert_redone_once(steps: list[int], total: int, every: int, checkpoint_every: int) -> list[int]:
    """Every logged step ran; steps up to the last checkpoint before the failure ran once, the steps
    after it at most twice (the killed stretch). Returns the steps that ran twice."""
    counts = Counter(steps)
    assert set(counts) == set(range(every, total + 1, every)), sorted(counts)
    twice = sorted(s for s, c in counts.items() if c == 2)
    assert all(c <= 2 for c in counts.values()), counts
    assert twice, "no step was redone: the failure did not interrupt training"
    resumed_from = (twice[0] - 1) // checkpoint_every * checkpoint_every
    assert twice == list(range(resumed_from + every, twice[-1] + 1, every)), twice
    assert twice[-1] - resumed_from <= checkpoint_every + 2 * every, "more than one checkpoint interval was redone"
    return twice


def assert_complete(out: Path, bank_size: int, eval_size: int) -> None:
    assert (out / "summary.json").is_file()
    for name, size in (("bank_base", bank_size), ("bank_final", eval_size)):
        bank = read_bank(out / f"{name}.parquet")
        assert sorted(bank.ids.tolist()) == list(range(size)), name


def test_rehearsal_spreads_the_pools_over_both_nodes_and_a_killed_training_worker_restarts(loopback_cluster):
    """The docs' ``ray job submit`` line, as written (plus `REHEARSAL_RUN`'s two settings): a training worker is
    killed after step 60 of 100; the run completes, only the steps after the last checkpoint (50) are redone, once,
    and the reward actors and the training workers (the restarted one too) ran on both nodes."""
    cluster = loopback_cluster
    handled = {"export", "ray start", "ray job submit", "mlflow ui"}
    lines = cluster["lines"]
    assert all(any(line.startswith(h) for h in handled) for line in lines), lines
    (submit,) = [line for line in lines if line.startswith("ray job submit")]
    run = submit_job(" ".join([submit, *REHEARSAL_RUN]), cluster["env"])
    # the victim is chosen once training runs; the kill then follows the step-60 line at once (a state query
    # there would take seconds, in which the last 40 steps can end and the workers with them)
    run.wait_for(lambda d: any(s >= 10 for s in d.steps()), timeout=600)
    alive = actors(cluster, "RayTrainWorker", alive_only=True)
    before = {a["actor_id"] for a in alive}
    run.wait_for(lambda d: any(s >= 60 for s in d.steps()))
    os.kill(alive[0]["pid"], signal.SIGKILL)
    run.finish(timeout=900)
    twice = assert_redone_once(run.steps(), 100, 10, 50)
    assert twice[0] == 60
    out = Path(cluster["env"]["TFFT_SHARED"]) / "runs" / "smoke"
    assert_complete(out, 1000, 1000)
    restarted = {a["actor_id"] for a in actors(cluster, "RayTrainWorker")} - before
    assert restarted, "no new training worker was started"
    nodes = {n["node_id"] for n in state(cluster, "nodes")}
    assert len(nodes) == 2
    reward_nodes = {a["node_id"] for a in actors(cluster, "RewardActor")}
    train_nodes = {a["node_id"] for a in actors(cluster, "RayTrainWorker")}
    assert reward_nodes == nodes, "reward actors did not run on both nodes"
    assert train_nodes == nodes, "training workers did not run on both nodes"
    # what the MLflow UI of the walk-through shows: the run, its tail statistics
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(cluster['env']['TFFT_SHARED']) / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'smoke'")
    assert runs and "finetuned.cvar_right_0.1" in runs[0].data.metrics


def test_killed_reward_actor_has_its_batch_redone_once(loopback_cluster):
    cluster = loopback_cluster
    out = cluster["root"] / "kill-reward"
    log = cluster["root"] / "reward-calls.log"
    args = tfft(
        cluster, "bank", out, "bank.size=1000", "bank.reward.batch_size=50",
        "reward.target=counting_reward:Counting", f"reward.kwargs={{log: '{log}', seconds: 0.01}}",
    )
    run = Driver(args, cluster["env"])
    run.wait_for(lambda d: log.is_file() and len(log.read_text().splitlines()) >= 200)
    victim = actors(cluster, "RewardActor", alive_only=True)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    run.finish()
    bank = read_bank(out / "bank_base.parquet")
    assert sorted(bank.ids.tolist()) == list(range(1000)) and bank.valid.all()
    np.testing.assert_allclose(bank.reward, bank.x.sum(1), rtol=0, atol=1e-12)
    counts = Counter(log.read_text().splitlines())
    keys = {f"{float(a)!r},{float(b)!r}" for a, b in bank.x}
    assert set(counts) == keys, "a sample was lost or an unknown sample was scored"
    assert max(counts.values()) <= 2
    # batches the killed actor had finished are in the reward cache: only the batch it was scoring
    # (without the cache: every batch queued on it, Ray Data's in-flight tasks per actor) is redone
    assert sum(c == 2 for c in counts.values()) <= 50, "more than the killed actor's batch was redone"
    assert sum(len(read_bank(s)) for s in (out / "bank_base.parquet.shards").glob("shard-*.parquet")) == 1000


def test_killed_driver_resumes_finished_stages_and_the_training_checkpoint(loopback_cluster):
    cluster = loopback_cluster
    out = cluster["root"] / "kill-driver"
    args = tfft(cluster, "run", out, "bank.size=1000", "eval.size=1000", "finetune.steps=100", *FAULT_RUN)
    first = Driver(args, cluster["env"])
    first.wait_for(lambda d: any(s >= 60 for s in d.steps()))
    first.kill()
    assert not (out / "summary.json").exists()
    second = Driver(args, cluster["env"])
    second.finish()
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["bank_base"]["status"] == "reused", "the base bank was built again"
    assert stages["finetune"]["status"] == "resumed" and stages["finetune"]["steps_reused"] == 50, stages["finetune"]
    assert second.steps()[0] == 60, "fine-tuning did not continue from its latest checkpoint"
    assert_redone_once(first.steps() + second.steps(), 100, 10, 50)
    assert_complete(out, 1000, 1000)
