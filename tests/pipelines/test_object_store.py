"""Outputs and caches on an object store (`pipelines.storage`, `pipelines.mirror`), against a local S3 server.

The server is moto's (``moto[server]``), reached through the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), as a user reaches S3 or an S3-compatible store. Checked: the store's round trip and
what it lists; reward-cache parts from two writers read by a third; a store that cannot be reached or has no
bucket is one line naming the setting; a driver killed mid-bank and started again from another machine's empty
working copy scores only what the store lacks, while a second run beside it (Ray Train's worker group, its
checkpoints written to the store by the workers themselves) takes the rewards already scored from the shared cache
and leaves every output on the store. The two runs beside each other each start their own local Ray: neither
disturbs the other (no error line from Ray in either log); a two-trial sweep with its outputs on the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket

import numpy as np
import pytest

pytest.importorskip("moto")

from pipelines.cli import main  # noqa: E402
from pipelines.mirror import Mirror  # noqa: E402
from pipelines.reward_cache import RewardCache, sample_keys  # noqa: E402
from pipelines.storage import Store, StorageError, check_writable  # noqa: E402

BUCKET = "tfft-test"
TINY = ["bank.size=256", "bank.shard_size=128", "eval.size=256", "pretrain.steps=40", "finetune.steps=6",
        "finetune.batch_size=64", "sampler.steps=8", "finetune.log_every=3", "finetune.checkpoint_every=3",
        "finetune.num_workers=1"]  # Ray Train's worker group: its checkpoints go to the store directly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A local S3 server with one bucket, and the environment a user would set for it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def test_store_round_trip_and_listing(s3, tmp_path):
    for root in (f"{s3}/unit", str(tmp_path / "local")):
        store = Store(root)
        assert store.files() == {}
        store.write_bytes("a.bin", b"x" * 10)
        store.write_bytes("sub/b.json", b"{}")
        store.write_bytes(".hidden.tmp", b"partial")  # temporary names are never listed
        assert store.files() == {"a.bin": 10, "sub/b.json": 2}
        assert store.read_bytes("sub/b.json") == b"{}" and store.exists("a.bin") and not store.exists("c")
        assert store.child("sub").files() == {"b.json": 2}
        store.delete("a.bin")
        store.delete("a.bin")  # deleting a missing file is not an error
        assert set(store.files()) == {"sub/b.json"}


def test_reward_cache_parts_from_two_writers_on_the_store(s3):
    x = np.random.default_rng(0).normal(size=(6, 3))
    keys = sample_keys(x)
    first, second = RewardCache(f"{s3}/cache", "rid"), RewardCache(f"{s3}/cache", "rid")
    first.add(keys[:3], np.arange(3.0), np.ones(3, bool), np.array(["", "", "nan"], dtype=object))
    second.add(keys[3:], np.arange(3.0, 6.0), np.ones(3, bool), np.array(["", "timeout", ""], dtype=object))
    reader = RewardCache(f"{s3}/cache", "rid")
    hit, reward, _, error = reader.lookup(keys)
    assert hit.tolist() == [True, True, True, True, False, True]  # a transient failure is not cached
    assert reward[[0, 1, 3, 5]].tolist() == [0.0, 1.0, 3.0, 5.0] and error[2] == "nan"
    assert len(Store(f"{s3}/cache/rid").files()) == 2


def test_unreachable_store_or_missing_bucket_is_one_line(s3, set_env):
    with pytest.raises(StorageError, match=r"^'bank.cache_dir': cannot write .*'s3://no-such-bucket/x'"):
        check_writable("s3://no-such-bucket/x", "bank.cache_dir")
    set_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(StorageError) as info:
        check_writable(f"{s3}/x", "--out")
    message = str(info.value)
    assert message.startswith("'--out': cannot write") and "AWS_ENDPOINT_URL" in message and "\n" not in message
    assert "testing" not in message  # no credential in the message


def test_mirror_pushes_committed_files_and_a_fresh_copy_pulls_them(s3, tmp_path):
    uri = f"{s3}/mirror"
    with Mirror(uri, tmp_path / "one", interval_s=0, log=lambda _: None) as local:
        (local / "shards").mkdir()
        (local / "shards" / "shard-0.parquet").write_bytes(b"0" * 100)
        (local / ".shard-1.parquet.tmp").write_bytes(b"partial")  # not committed: never pushed
    assert Store(uri).files() == {"shards/shard-0.parquet": 100}
    other = Mirror(uri, tmp_path / "two", interval_s=0, log=lambda _: None)
    assert other.pull() == 1 and (tmp_path / "two" / "shards" / "shard-0.parquet").read_bytes() == b"0" * 100
    assert other.push() == 0  # what was pulled is not pushed back


SLOW_REWARD = '''
import os
import time

def reward(x):
    with open(os.environ["TFFT_TEST_SCORED"], "a") as fh:  # one line per scored batch: its size
        fh.write(f"{len(x)}\\n")
    time.sleep(0.4)
    return -((x - 1.0) ** 2).sum(-1)
'''
KILL = ["bank.size=384", "bank.shard_size=64", "bank.reward.batch_size=32", "bank.sampler.batch_size=64",
        "eval.size=64", "pretrain.steps=40", "finetune.steps=4", "finetune.batch_size=32", "sampler.steps=8",
        "finetune.log_every=2", "finetune.checkpoint_every=2", "finetune.backend=local", "finetune.num_workers=1",
        "reward.target=slow_reward:reward"]
# Lines that mean Ray or a stage went wrong: Ray's error-level log lines ("[2026-01-01 10:00:00,123 E 4242 4243]"),
# tracebacks, ERROR-level Python logging, and "Found multiple active Ray instances" (one run's Ray Train looking up
# its cluster by address and finding the other run's Ray; `pipelines.raysession.connect` fixes each local Ray's
# GCS port and tells its workers the address). Two Ray faults that are not about sharing a machine, seen in runs
# alone too, are left out: an actor pool whose actors take their constructor arguments (the model's weights) from
# the object store logs an error-level line about a possible restart; now and then a Ray Data conversion task
# (``ndarray_to_block``) aborts in Ray's own code ("Mutex corrupt", SIGABRT) after its work is done, and Ray
# retries it with the same results.
BAD = re.compile(r"Found multiple active Ray instances|Traceback|\bERROR\b|,\d{3} E \d+ \d+\]")
BENIGN = re.compile(r"has constructor arguments in the object store and max_restarts > 0|\(ndarray_to_block pid=")
TRAINING = 4 * 32  # rewards the fine-tuning steps score directly (not through the bank or its cache)


def _scored(path) -> int:
    return sum(int(line) for line in path.read_text().split()) if path.is_file() else 0


def _start(args: list[str], tmp_path, tag: str, mirror: str):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each run starts its own local Ray
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "modules"), str(root)]),
               TFFT_MIRROR_DIR=str(tmp_path / mirror), TFFT_MIRROR_PUSH_S="1",
               TFFT_TEST_SCORED=str(tmp_path / f"scored-{tag}.txt"))
    log = open(tmp_path / f"{tag}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "tune_configs/toy2d_right.yaml", *args],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.ray
def test_killed_driver_resumes_from_the_store_and_two_runs_share_the_reward_cache(s3, tmp_path):
    """A driver killed (with its Ray) mid-bank, started again from another machine's empty copy, scores only what
    the store lacks; a second run started beside it, on the same reward cache, takes the rewards the first
    scored from the cache instead of scoring them."""
    import signal
    import time

    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "slow_reward.py").write_text(SLOW_REWARD)
    out, other = f"{s3}/kill/a", f"{s3}/kill/b"
    common = [*KILL, f"pretrain.cache_dir={s3}/kill-pretrain", f"bank.cache_dir={s3}/kill-rewards",
              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    first = _start(["--out", out, *common], tmp_path, "first", "machine-a")
    deadline = time.time() + 240
    shards: list[str] = []
    while time.time() < deadline and first.poll() is None and len(shards) < 2:
        time.sleep(0.5)
        shards = [n for n in Store(out).files() if ".shards/shard-" in n]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert len(shards) >= 2, (tmp_path / "first.log").read_text()[-3000:]
    committed = 64 * len([n for n in Store(out).files() if ".shards/shard-" in n and "base" in n])
    scored_before = _scored(tmp_path / "scored-first.txt")
    assert 128 <= committed < 384 and scored_before >= committed

    again = _start(["--out", out, *common], tmp_path, "again", "machine-b")  # another machine: nothing local
    # a second run, same cache, fine-tuning in Ray Train's worker group (its checkpoints go to the store directly)
    beside = _start(["--out", other, *common, "finetune.backend=ray"], tmp_path, "beside", "machine-c")
    assert again.wait(600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert beside.wait(600) == 0, (tmp_path / "beside.log").read_text()[-3000:]
    # the resumed run scores the base bank's rows that no committed shard holds, plus its evaluation bank and the
    # training samples' rewards; never the committed rows (their rewards are in the shards and in the cache)
    resumed = _scored(tmp_path / "scored-again.txt")
    fresh = _scored(tmp_path / "scored-beside.txt")
    assert resumed <= (384 - committed) + 64 + TRAINING  # uncommitted base rows + eval bank + training batches
    # same seed, same samples: the run beside reads from the shared cache at least what the killed run scored
    assert fresh <= 384 + 64 + TRAINING - committed
    a = json.loads(Store(out).read_bytes("summary.json"))
    b = json.loads(Store(other).read_bytes("summary.json"))
    assert a["base"] == b["base"] and a["threshold"] == b["threshold"]
    files = Store(other).files()  # every output of the run beside is on the store
    assert {"config.yaml", "summary.json", "bank_base.parquet", "bank_final.parquet"} <= set(files)
    assert any(name.startswith("checkpoint/") for name in files)
    assert any(name.startswith("train/finetune/") and name.endswith("state.pt") for name in files)
    assert b["finetuned"]["n"] == 64 and len(Store(f"{s3}/kill-pretrain").files()) == 1
    for tag in ("again", "beside"):  # two local Rays on one machine at once: no error line from Ray in either log
        text = (tmp_path / f"{tag}.log").read_text(errors="replace")
        bad = [line for line in text.splitlines() if BAD.search(line) and not BENIGN.search(line)]
        assert not bad, f"{tag}'s log has error lines:\n" + "\n".join(bad[:10])


@pytest.mark.ray
def test_two_trial_sweep_with_outputs_and_caches_on_the_store(s3, tmp_path, set_env):
    """``tfft sweep --out s3://...`` on one machine: both trials' outputs, the report and the sweep's log end up on
    the store (its local copy is pushed), with both caches on the store too."""
    import ray

    from pipelines.raysession import connect
    from pipelines.schema import RayConfig

    if ray.is_initialized():
        ray.shutdown()
    connect(RayConfig(num_cpus=2))
    try:
        out = f"{s3}/sweeps/smoke"
        set_env(TFFT_MIRROR_DIR=str(tmp_path / "mirror"))
        args = ["sweep", "tune_configs/sweep_toy2d_smoke.yaml", "--out", out, *TINY,
                "sweep.parameters.objective.kl_weight.grid=[10]", "finetune.backend=local",
                f"pretrain.cache_dir={s3}/pretrain",
                f"bank.cache_dir={s3}/rewards", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        assert main(args) == 0
        files = set(Store(out).files())
        summaries = sorted(name for name in files if name.startswith("trials/") and name.endswith("/summary.json"))
        assert len(summaries) == 2, sorted(files)[:40]
        assert any(name.startswith("report/") for name in files)
        for name in summaries:
            assert json.loads(Store(out).read_bytes(name))["finetuned"]["n"] > 0
    finally:
        ray.shutdown()
