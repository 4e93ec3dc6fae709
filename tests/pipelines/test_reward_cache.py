"""The reward cache: identity separation, persistence, concurrent writers, what is cached."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from pipelines.reward_cache import RewardCache, reward_identity, sample_keys


def test_identity_depends_on_target_kwargs_and_version():
    a = reward_identity("m:R", {"k": 1}, "1")
    assert a == reward_identity("m:R", {"k": 1}, "1")
    assert len({a, reward_identity("m:R", {"k": 2}, "1"), reward_identity("m:R", {"k": 1}, "2"),
                reward_identity("m:S", {"k": 1}, "1")}) == 4


def test_keys_follow_content():
    x = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0000001]])
    k = sample_keys(x)
    assert k[0] == k[1] != k[2] and all(len(v) == 16 for v in k)


def test_roundtrip_and_only_deterministic_outcomes_are_cached(tmp_path):
    cache = RewardCache(tmp_path, "id")
    x = np.arange(10.0).reshape(5, 2)
    keys = sample_keys(x)
    reward = np.array([1.0, np.nan, 3.0, np.nan, 5.0])
    valid = np.array([True, False, True, False, True])
    error = np.array(["", "nan", "", "timeout", ""], dtype=object)
    assert cache.add(keys, reward, valid, error) == 4  # the timeout is not cached
    fresh = RewardCache(tmp_path, "id")
    hit, r, v, e = fresh.lookup(keys)
    assert hit.tolist() == [True, True, True, False, True]
    assert r[0] == 1.0 and r[4] == 5.0 and not v[1] and e[1] == "nan"
    assert len(RewardCache(tmp_path, "other")) == 0


def _writer(root: str, start: int) -> None:
    cache = RewardCache(root, "id")
    for j in range(20):
        x = np.array([[float(start + j), 0.0]])
        cache.add(sample_keys(x), np.array([float(start + j)]), np.array([True]), np.array([""], dtype=object))


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 100 * i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = RewardCache(tmp_path, "id")
    assert len(cache) == 80
    x = np.array([[float(100 * i + j), 0.0] for i in range(4) for j in range(20)])
    hit, r, _, _ = cache.lookup(sample_keys(x))
    assert hit.all() and np.array_equal(r, x[:, 0])
    assert not list((tmp_path / "id").glob(".*"))  # no temporary files left


def test_terms_are_cached_with_the_reward(tmp_path):
    cache = RewardCache(tmp_path, "id")
    x = np.arange(8.0).reshape(4, 2)
    keys = sample_keys(x)
    reward = np.array([1.0, np.nan, 3.0, np.nan])
    valid = np.array([True, False, True, False])
    error = np.array(["", "nan", "", "timeout"], dtype=object)
    terms = {"tail": np.array([0.5, np.nan, 1.5, 2.5]), "dist": np.array([-1.0, -2.0, -3.0, np.nan])}
    assert cache.add(keys, reward, valid, error, terms=terms) == 3
    assert cache.add(sample_keys(x + 100), reward, valid, error) == 3  # a part without terms
    fresh = RewardCache(tmp_path, "id")
    hit, r, v, e = fresh.lookup(keys + sample_keys(x[:1] + 100))
    assert hit.tolist() == [True, True, True, False, True] and r[2] == 3.0
    got = fresh.lookup_terms(keys + sample_keys(x[:1] + 100), ["tail", "dist", "other"])
    np.testing.assert_array_equal(got["tail"], [0.5, np.nan, 1.5, np.nan, np.nan])  # miss and no terms: NaN
    np.testing.assert_array_equal(got["dist"], [-1.0, -2.0, -3.0, np.nan, np.nan])  # a failed sample keeps its terms
    assert np.isnan(got["other"]).all()
    np.testing.assert_array_equal(cache.lookup_terms(keys[:1], ["tail"])["tail"], [0.5])  # the writer's own index
