"""Bank storage: parquet round trip, failure counts, atomic writes, per-term columns."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipelines.bankio import Bank, bank_to_table, concat_banks, read_bank, table_to_bank, write_atomic


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


def test_term_columns_roundtrip_and_concat():
    bank = _bank(range(6), invalid=(1,))
    terms = {"tail": np.array([1.0, np.nan, 3.0, 4.0, 5.0, 6.0]), "dist": -np.arange(6.0)}
    with_terms = Bank(**{f: getattr(bank, f) for f in Bank.__dataclass_fields__ if f != "terms"}, terms=terms)
    table = bank_to_table(with_terms)
    assert table.column_names[-2:] == ["term.tail", "term.dist"] and table.schema.field("term.tail").type == "double"
    back = table_to_bank(table)
    assert list(back.terms) == ["tail", "dist"]
    for name, values in terms.items():
        np.testing.assert_array_equal(back.terms[name], values)
    assert table_to_bank(bank_to_table(bank)).terms == {}  # a bank without terms has no term column
    assert "term.tail" not in bank_to_table(bank).column_names
    # shards are sorted by id together with their terms; a shard without a term gets NaN there
    merged = concat_banks([table_to_bank(table.slice(3)), table_to_bank(table.slice(0, 3)), _bank([6, 7])])
    assert merged.ids.tolist() == list(range(8))
    np.testing.assert_array_equal(merged.terms["tail"], [1.0, np.nan, 3.0, 4.0, 5.0, 6.0, np.nan, np.nan])
    np.testing.assert_array_equal(merged.terms["dist"][:6], terms["dist"])


def test_files_written_before_terms_existed_still_read(tmp_path):
    bank = _bank(range(4))
    old = bank_to_table(bank)  # the columns of the first bank format, nothing else
    assert old.column_names == ["id", "x", "reward", "valid", "error", "seconds", "attempts", "cached"]
    pq.write_table(old, tmp_path / "old.parquet")
    back = read_bank(tmp_path / "old.parquet")
    assert back.terms == {} and len(back) == 4
