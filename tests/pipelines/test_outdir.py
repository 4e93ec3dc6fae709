"""Output-directory guard: a rerun resumes the same config, refuses another and names what differs; a run made
before a schema key existed still resumes while that key keeps its default."""

from __future__ import annotations

import re

import pytest

from pipelines.config import ConfigError, load_config, to_yaml
from pipelines.outdir import claim_output_dir, config_differences


def test_rerun_with_another_config_names_the_keys(tmp_path) -> None:
    first = to_yaml(load_config(None, ["finetune.lr=0.01"]))
    claim_output_dir(tmp_path, first)
    claim_output_dir(tmp_path, first)  # the same config resumes
    with pytest.raises(ConfigError, match=r"differs in bank.size, finetune.lr\)"):
        claim_output_dir(tmp_path, to_yaml(load_config(None, ["finetune.lr=0.02", "bank.size=7"])))


def test_a_key_added_since_the_old_run_counts_only_off_its_default(tmp_path) -> None:
    now = to_yaml(load_config(None, []))
    before = re.sub(r"\n  time_power: [^\n]*", "", now)  # as written before finetune.time_power existed
    assert "time_power" not in before and config_differences(before, now) == []
    (tmp_path / "config.yaml").write_text(before)
    claim_output_dir(tmp_path, now)
    assert (tmp_path / "config.yaml").read_text() == now
    changed = to_yaml(load_config(None, ["finetune.time_power=2"]))
    assert config_differences(before, changed) == ["finetune.time_power"]
