"""Fault injection through the whole bank stage against a real HTTP reward server on loopback.

``tfft bank tune_configs/toy2d_http.yaml`` with the url pointed at the example server (faults on, bands
of x0 scaled to the 2-D task's samples): the sampler pool draws the samples, the reward pool's actors
send them to the server through ``rewards.http:Endpoint``. Every sample must land in the bank once, with
the reason that follows from its own input, and the valid rewards must be the server's function.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.bankio import read_bank
from pipelines.cli import main
from rewards.examples.http_server import REASON_OF_FAULT, fault_of, reward_of, serve

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
SCALE = 0.25  # bands of x0: good |x0| <= 1, 400 in (1, 1.25], transient [-1.25, -1), 500 in (1.25, 2.5]...
SIZE = 64


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipelines.raysession import connect
    from pipelines.schema import RayConfig

    if ray.is_initialized():
        ray.shutdown()
    connect(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def test_bank_through_a_faulty_http_server(ray_session, tmp_path):
    server, url = serve(faults=True, fault_scale=SCALE, record=True)
    try:
        timeout_s, retries, batch_size = 0.5, 1, 8
        args = [
            "bank", str(ROOT / "tune_configs/toy2d_http.yaml"), "--out", str(tmp_path / "out"),
            f"reward.kwargs.url={url}", f"reward.kwargs.timeout_s={timeout_s}", f"reward.kwargs.retries={retries}",
            f"reward.kwargs.batch_size={batch_size}", "reward.kwargs.backoff_s=0.01",
            f"bank.size={SIZE}", f"bank.shard_size={SIZE}", "bank.reward.batch_size=32", "bank.sampler.batch_size=32",
            "bank.reward.num_cpus=0.5", "bank.sampler.num_cpus=0.5",
            "pretrain.steps=200", "pretrain.n_samples=4000", f"pretrain.cache_dir={tmp_path / 'cache'}",
            f"bank.cache_dir={tmp_path / 'rewards'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        began = time.perf_counter()
        assert main(args) == 0
        wall = time.perf_counter() - began
    finally:
        server.shutdown()
    bank = read_bank(tmp_path / "out" / "bank_base.parquet")
    assert len(bank) == SIZE and sorted(bank.ids.tolist()) == list(range(SIZE))  # every sample once
    faults = [fault_of(row, SCALE) for row in bank.x]
    want = np.array([REASON_OF_FAULT[f] for f in faults], dtype=object)
    assert (bank.error == want).all(), [(f, e) for f, e in zip(faults, bank.error) if REASON_OF_FAULT[f] != e]
    np.testing.assert_array_equal(bank.valid, want == "")
    assert bank.reward[bank.valid].tolist() == [reward_of(row) for row in bank.x[bank.valid].tolist()]
    counts = bank.accounting()
    assert counts["valid"] + counts["invalid"] == SIZE
    kinds = set(faults) - {""}
    assert len(kinds) >= 4 and 10 <= counts["valid"] < SIZE, (sorted(kinds), counts)  # the bands are hit
    transient = np.array([f == "transient" for f in faults])
    assert (bank.attempts[transient] >= 2).all()  # failed once, retried, valid
    bad_request = np.array([f == "bad_request" for f in faults])
    assert (bank.attempts[bad_request] <= int(np.log2(batch_size)) + 1).all()  # never repeated alone
    # each sample in as many requests as its attempts (non-finite rows are never sent; there are none)
    held = {tuple(row): 0 for row in bank.x.tolist()}
    for logged in server.log:
        for row in logged.rows:
            held[row] += 1
    assert [held[tuple(row)] for row in bank.x.tolist()] == bank.attempts.tolist()
    print(f"bank of {SIZE} through the HTTP server: {wall:.1f} s, {counts}")
