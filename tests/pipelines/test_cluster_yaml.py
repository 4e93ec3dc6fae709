"""cluster.yaml passes Ray's own cluster-config validation and routes pools to their node types."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).parents[2] / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_installed_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on a schema violation
    types = config["available_node_types"]
    assert types["gpu_train"]["resources"]["GPU"] >= 1
    assert types["cpu_reward"]["resources"].get("reward_node") == 1
    assert config["head_node_type"] == "head"
