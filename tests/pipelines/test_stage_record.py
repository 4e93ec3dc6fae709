"""`pipelines.stage_record`: a stage's record and the status of a stage made of parts."""

from __future__ import annotations

import json

import pytest

from pipelines.stage_record import StageRecord, combined_status


def test_a_record_is_its_status_seconds_and_counts_as_json():
    record = StageRecord("resumed", 1.5, {"sampled": 2000, "from_shards": 2000})
    assert json.loads(json.dumps(record.to_dict())) == {"status": "resumed", "seconds": 1.5, "sampled": 2000,
                                                         "from_shards": 2000}
    with pytest.raises(ValueError, match="'rebuilt'"):
        StageRecord("rebuilt", 0.0)


@pytest.mark.parametrize("statuses, want", [
    (["built"], "built"), (["reused"], "reused"), (["resumed"], "resumed"),
    (["built", "built"], "built"), (["reused", "reused", "reused"], "reused"),
    (["reused", "built"], "resumed"),  # refinement after a kill: the first round stored, the next one new
    (["built", "resumed"], "resumed"), (["resumed", "resumed"], "resumed"),
])
def test_a_stage_of_parts_is_built_or_reused_only_when_every_part_is(statuses, want):
    assert combined_status(statuses) == want


def test_a_stage_has_at_least_one_part():
    with pytest.raises(ValueError):
        combined_status([])
