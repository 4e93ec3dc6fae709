"""Bank storage: parquet round trip, failure counts, atomic writes."""

from __future__ import annotations

import numpy as np

from pipelines.bankio import Bank, concat_banks, read_bank, write_atomic


def _bank(ids, d=3, invalid=()):
    n = len(ids)
    rng = np.random.default_rng(0)
    valid = np.ones(n, dtype=bool)
    valid[list(invalid)] = False
    reward = np.where(valid, rng.normal(size=n), np.nan)
    error = np.array(["" if v else "timeout" for v in valid], dtype=object)
    return Bank(
        np.asarray(ids), rng.normal(size=(n, d)), reward, valid, error, np.full(n, 0.01),
        np.ones(n, dtype=int), np.zeros(n, dtype=bool),
    )


def test_roundtrip_and_failure_counts(tmp_path):
    bank = _bank(range(10), invalid=(2, 5))
    write_atomic(bank, tmp_path / "b.parquet")
    back = read_bank(tmp_path / "b.parquet")
    for field in ("ids", "x", "valid", "seconds", "attempts", "cached"):
        np.testing.assert_array_equal(getattr(back, field), getattr(bank, field))
    np.testing.assert_array_equal(np.isnan(back.reward), ~bank.valid)
    assert back.failure_counts() == {"timeout": 2} and back.n_valid == 8
    assert back.accounting() == {
        "requested": 10, "valid": 8, "invalid": 2, "cached": 0, "attempts": 10, "invalid_timeout": 2
    }
    assert [p.name for p in tmp_path.iterdir()] == ["b.parquet"]  # no temporary file left


def test_concat_sorts_by_id():
    merged = concat_banks([_bank([5, 6, 7]), _bank([0, 1])])
    assert merged.ids.tolist() == [0, 1, 5, 6, 7] and merged.x.shape == (5, 3)
