"""Fault injection through the whole bank stage against a real HTTP reward server on loopback.

``tfft bank tune_configs/toy2d_http.yaml`` with the url pointed at the example server (faults on, bands
of x0 scaled to the 2-D task's samples): the sampler pool draws the samples, the reward pool's actors
send them to the server through ``rewards.http:Endpoint``. Every sample must land in the bank once, with
the reason that follows from its own input, and the valid rewards must be the server's function.

The same session also builds banks of a composite reward (``rewards.compose:WeightedSum``): each term a
bank column, through the reward pool and the reward cache.
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


def test_bank_through_a_faulty_http_server(local_ray, tmp_path, pretrain_cache):
    server, url = serve(faults=True, fault_scale=SCALE, record=True)
    try:
        timeout_s, retries, batch_size = 0.5, 1, 8
        args = [
            "bank", str(ROOT / "tune_configs/toy2d_http.yaml"), "--out", str(tmp_path / "out"),
            f"reward.kwargs.url={url}", f"reward.kwargs.timeout_s={timeout_s}", f"reward.kwargs.retries={retries}",
            f"reward.kwargs.batch_size={batch_size}", "reward.kwargs.backoff_s=0.01",
            f"bank.size={SIZE}", f"bank.shard_size={SIZE}", "bank.reward.batch_size=32", "bank.sampler.batch_size=32",
            "bank.reward.num_cpus=0.5", "bank.sampler.num_cpus=0.5",
            "pretrain.steps=200", "pretrain.n_samples=4000", f"pretrain.cache_dir={pretrain_cache}",
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


def test_bank_of_a_composite_reward_keeps_each_term_as_a_column(local_ray, tmp_path, pretrain_cache):
    """``tfft bank tune_configs/toy2d_composite.yaml`` (a crash region on the 2-D term), twice with one reward
    cache: the bank's term columns are each term evaluated on the bank's x, the reward their weighted sum; the
    second bank takes every sample from the cache, its term columns included."""
    import torch

    from rewards.toy2d import TailReward2D, distance_penalty

    common = [
        "reward.kwargs.terms=[{target: 'rewards.toy2d:TailReward2D', kwargs: {crash_radius: 0.6}},"
        " {target: 'rewards.toy2d:distance_penalty', weight: 0.2, name: distance}]",
        f"bank.size={SIZE}", f"bank.shard_size={SIZE // 2}", "bank.reward.batch_size=16", "bank.sampler.batch_size=32",
        "bank.reward.num_cpus=0.5", "bank.sampler.num_cpus=0.5", "bank.reward.call_size=8",
        "pretrain.steps=200", "pretrain.n_samples=4000", f"pretrain.cache_dir={pretrain_cache}",
        f"bank.cache_dir={tmp_path / 'rewards'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    config = str(ROOT / "tune_configs/toy2d_composite.yaml")
    began = time.perf_counter()
    assert main(["bank", config, "--out", str(tmp_path / "first"), *common]) == 0
    assert main(["bank", config, "--out", str(tmp_path / "second"), *common]) == 0
    wall = time.perf_counter() - began
    first = read_bank(tmp_path / "first" / "bank_base.parquet")
    second = read_bank(tmp_path / "second" / "bank_base.parquet")
    assert len(first) == SIZE and sorted(first.ids.tolist()) == list(range(SIZE))
    assert list(first.terms) == ["TailReward2D", "distance"]
    x = torch.from_numpy(np.array(first.x))  # a writable copy
    tail = TailReward2D(crash_radius=0.6).evaluate(x)
    np.testing.assert_array_equal(first.terms["TailReward2D"], np.where(tail.valid, tail.rewards, np.nan))
    np.testing.assert_array_equal(first.terms["distance"], distance_penalty(x).numpy())
    np.testing.assert_array_equal(first.valid, tail.valid.numpy())
    assert 0 < (~first.valid).sum() < SIZE // 2 and set(first.error[~first.valid]) == {"crash"}
    want = first.terms["TailReward2D"] + 0.2 * first.terms["distance"]
    np.testing.assert_array_equal(first.reward, want)  # NaN where the 2-D term crashed
    # crashes are not cached (transient): the second bank evaluates them again, and takes the rest from the cache
    assert not first.cached.any() and (second.cached == first.valid).all()
    np.testing.assert_array_equal(second.x, first.x)
    for name in first.terms:
        np.testing.assert_array_equal(second.terms[name], first.terms[name])
    print(f"two banks of {SIZE} with a composite reward: {wall:.1f} s")
