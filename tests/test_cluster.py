"""cluster/h100.yaml against the schema Ray's autoscaler ships, plus our own invariants."""

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "cluster" / "h100.yaml"


def check_invariants(config: dict) -> None:
    """32 H100s at most across p5.48xlarge workers, a GPU-free head, no secrets, private dashboard."""
    validate_config(prepare_config(copy.deepcopy(config)))
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    if head.get("resources", {}).get("GPU", 0):
        raise ValueError("the head node must not take GPU work")
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    total = 0
    for node in workers:
        if node["node_config"]["InstanceType"] != "p5.48xlarge" or node["resources"].get("GPU") != 8:
            raise ValueError("GPU workers are p5.48xlarge with 8 GPUs declared")
        total += node["max_workers"] * node["resources"]["GPU"]
    if total != 32 or config["max_workers"] != 4:
        raise ValueError(f"expected 4 workers x 8 = 32 H100s (the paper's), got {total}")
    text = yaml.safe_dump(config)
    if re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|password", text, re.I):
        raise ValueError("credentials must come from the instance profile, not the file")
    for node in nodes.values():
        if "IamInstanceProfile" not in node["node_config"]:
            raise ValueError("every node needs the S3 instance profile")
    if any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"]):
        raise ValueError("the dashboard must not listen on all interfaces")


def test_cluster_config_is_valid():
    check_invariants(yaml.safe_load(CONFIG.read_text()))


def _planted(mutate):
    config = yaml.safe_load(CONFIG.read_text())
    mutate(config)
    return config


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_wokers=4),                                          # misspelt key: schema
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="two"),  # wrong type: schema
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=4),  # 16 GPUs
    lambda c: c["available_node_types"]["gpu_worker"]["node_config"].update(
        aws_secret_access_key="x"),                                             # a secret
    lambda c: c["head_start_ray_commands"].append("ray start --head --dashboard-host=0.0.0.0"),
    lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
])
def test_planted_errors_are_caught(mutate):
    with pytest.raises(Exception):
        check_invariants(_planted(mutate))
