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
    assert config["head_node_type"] == "head"
    # the custom resources that pin the pools (docs/cluster.md): reward actors only on cpu_reward
    # nodes, one slot per core; training workers only on gpu_train nodes, one slot per GPU
    hosts = {
        kind: {name for name, t in types.items() if t["resources"].get(kind, 0) >= 1}
        for kind in ("reward_node", "train_node")
    }
    assert hosts == {"reward_node": {"cpu_reward"}, "train_node": {"gpu_train"}}
    assert types["cpu_reward"]["resources"]["reward_node"] == types["cpu_reward"]["resources"]["CPU"]
    assert types["gpu_train"]["resources"]["train_node"] == types["gpu_train"]["resources"]["GPU"]
