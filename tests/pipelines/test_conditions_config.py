"""``data.conditions`` and ``objective.per_condition``: resolution, checks and refusals, each naming its key;
the condition column of a bank and the condition in the reward cache key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.bankio import Bank, concat_banks, read_bank, write_atomic
from pipelines.config import ConfigError, load_config
from pipelines.models import build_model, model_config
from pipelines.reward_cache import sample_keys
from pipelines.schema import ModelConfig
from rewards.base import load_reward, reward_takes_cond

ROOT = Path(__file__).parents[2]
COND = ["data.conditions=[a,b]", "reward.target=user_flow_model:first_coordinate_given"]


@pytest.fixture(autouse=True)
def _user_modules(import_path):
    import_path(str(Path(__file__).parent))


def _error(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert f"'{key}'" in str(info.value), str(info.value)
    return str(info.value)


def test_lists_and_callables_resolve_once():
    assert load_config(None, COND).data.conditions == ["a", "b"]
    cfg = load_config(None, ["data.conditions=conditions_helpers:labels", COND[1]])
    assert cfg.data.conditions == ["a", "b", 3]
    assert load_config(None, []).data.conditions == []
    assert load_config(None, COND).objective.per_condition is None


@pytest.mark.parametrize("value, words", [
    ("conditions_helpers:nothing", "empty"),
    ("[a,a]", "unique"),
    ("[1,'1']", "unique"),
    ("conditions_helpers:with_dict", "JSON scalars"),
    ("{a: 1}", "mapping"),
    ("conditions_helpers:broken", "no labels today"),
    ("conditions_helpers:missing", "no attribute"),
])
def test_bad_conditions_name_the_key(value, words):
    assert words in _error([f"data.conditions={value}", COND[1]], "data.conditions")


def test_a_reward_that_cannot_take_cond_is_refused():
    _error(["data.conditions=[a,b]", "reward.target=user_flow_model:first_coordinate"], "reward.target")
    _error(["data.conditions=[a,b]"], "reward.target")  # the default TailReward2D takes x only
    load_config(None, ["reward.target=user_flow_model:first_coordinate"])  # unconditional: as before


@pytest.mark.parametrize("override, key", [
    ("reward.screen.target=user_flow_model:first_coordinate_given", "reward.screen.target"),
    ("threshold.refine_rounds=2", "threshold.refine_rounds"),
    ("reward.serve.enabled=true", "reward.serve.enabled"),
])
def test_features_without_conditions_support_are_refused(override, key):
    _error([*COND, override], key)


def test_http_rewards_and_sweeps_are_refused():
    _error(["data.conditions=[a,b]", "reward.target=rewards.http:Endpoint", "reward.kwargs={url: 'http://h:1'}"],
           "reward.target")
    from pipelines.sweep.spec import load_sweep

    sweep = ROOT / "tune_configs" / "sweep_toy2d.yaml"
    with pytest.raises(ConfigError, match="'data.conditions'"):
        load_sweep(sweep, COND)


def test_per_condition_needs_conditions():
    _error(["objective.per_condition=false"], "objective.per_condition")
    assert load_config(None, [*COND, "objective.per_condition=false"]).objective.per_condition is False


def test_function_rewards_take_cond_by_signature():
    def plain(x, scale=1.0):
        return x[:, 0] * scale

    def conditional(x, cond):
        return x[:, 0] + torch.tensor([1.0 if c == "b" else 0.0 for c in cond], dtype=x.dtype)

    import sys

    module = sys.modules[__name__]
    module.plain, module.conditional = plain, conditional
    r_plain = load_reward(f"{__name__}:plain", {"scale": 2.0})
    r_cond = load_reward(f"{__name__}:conditional")
    assert not reward_takes_cond(r_plain) and reward_takes_cond(r_cond)
    x = torch.zeros(2, 2)
    assert r_cond.evaluate(x, cond=["a", "b"]).rewards.tolist() == [0.0, 1.0]
    batch, grad = r_cond.evaluate_with_grad(x, cond=["a", "b"])
    assert grad[:, 0].tolist() == [1.0, 1.0]
    assert r_plain.evaluate(x).rewards.tolist() == [0.0, 0.0]


def test_model_configs_gain_conditions_only_when_set():
    plain = model_config(ModelConfig(), 2)
    assert "num_conditions" not in plain and "conditions" not in plain
    built = build_model(model_config(ModelConfig(), 2, ["a", "b"]))
    assert built.config["num_conditions"] == 2
    user = model_config(ModelConfig(target="user_flow_model:conditional_gaussian_flow",
                                    kwargs={"means": {"a": [0, 0], "b": [1, 0]}}, sample_shape=[2, 1]), 2, ["a", "b"])
    assert user["conditions"] == ["a", "b"]
    model = build_model(user)
    out = model(torch.zeros(2, 2), torch.full((2,), 0.5), torch.tensor([0, 1]))
    assert out.shape == (2, 2) and not torch.allclose(out[0], out[1])  # each row its own condition's velocity


def test_bank_condition_column_round_trip(tmp_path):
    n = 4
    bank = Bank(ids=np.arange(n), x=np.zeros((n, 2)), reward=np.arange(n, dtype=float), valid=np.ones(n, bool),
                error=np.array([""] * n, dtype=object), seconds=np.zeros(n), attempts=np.ones(n, np.int64),
                cached=np.zeros(n, bool), cond=np.array([0, 0, 1, 1]), conditions=["a", 2])
    write_atomic(bank, tmp_path / "b.parquet")
    back = read_bank(tmp_path / "b.parquet")
    assert back.conditions == ["a", 2] and back.cond.tolist() == [0, 0, 1, 1]
    assert back.of_condition(1).reward.tolist() == [2.0, 3.0] and back.of_condition(1).conditions == ["a", 2]
    merged = concat_banks([back.take(np.array([2, 3])), back.take(np.array([0, 1]))])
    assert merged.cond.tolist() == [0, 0, 1, 1] and merged.conditions == ["a", 2]


def test_reward_cache_keys_include_the_condition():
    x = np.ones((2, 3))
    assert sample_keys(x) == sample_keys(x)  # unconditional keys as before
    a, b = sample_keys(x, ["a", "b"])
    assert a != b and a not in sample_keys(x)


def test_readme_conditional_example_loads_and_runs(tmp_path, import_path):
    """README's "Conditional models": the module and config load, and model, data and reward take conditions."""
    import re

    from pipelines.pretrain import _draw_conditional

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Conditional models"):readme.index("## Plugging in your own reward")]
    module, config = (body for _, body in re.findall(r"~~~(\w+)\n(.*?)~~~", section, re.S))
    (tmp_path / "my_labels.py").write_text("import numpy as np\nimport torch\nfrom torch import nn\n" + module)
    (tmp_path / "c.yaml").write_text(config)
    import_path(str(tmp_path))
    cfg = load_config(tmp_path / "c.yaml", ["pretrain.n_samples=5"])
    assert cfg.data.conditions == ["cat", "dog"] and cfg.objective.per_condition is True
    data, cond = _draw_conditional(cfg, 5)
    assert data.shape == (10, 2) and cond.tolist() == [0] * 5 + [1] * 5
    assert data[cond == 1, 0].mean() > data[cond == 0, 0].mean() + 1.5
    model = build_model(model_config(cfg.model, 2, cfg.data.conditions))
    assert model(torch.zeros(3, 2), torch.rand(3), torch.tensor([0, 1, 1])).shape == (3, 2)
    reward = load_reward(cfg.reward.target)
    assert reward.evaluate(torch.zeros(2, 2), cond=["cat", "dog"]).rewards.tolist() == [0.0, -1.0]
