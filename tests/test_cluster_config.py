"""cluster.yaml passes the validation `ray up` runs, and a typo would fail it."""
import copy
import os

import pytest
import yaml

from .conftest import REPO


def validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(REPO, "cluster.yaml")) as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_is_valid_for_ray_up(cluster):
    validate(cluster)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert "GPU" not in head["resources"] and gpu and gpu[0]["max_workers"] >= 1
    assert any("--dashboard-host=0.0.0.0" in c for c in cluster["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in cluster["head_start_ray_commands"][1:])
    assert any("torch==2.13.0" in c for c in cluster["setup_commands"])


@pytest.mark.parametrize("mutate,error", [
    (lambda c: c["available_node_types"]["gpu.worker"].update(min_worker=1), "min_worker"),
    (lambda c: c.update(head_node_type="cpu.haed"), "head_node_type"),
    (lambda c: c["provider"].pop("type"), "type"),
])
def test_a_typo_fails_validation(cluster, mutate, error):
    bad = copy.deepcopy(cluster)
    mutate(bad)
    with pytest.raises(Exception, match=error):
        validate(bad)
