"""Cluster fixtures: one local Ray cluster for the whole session (real Ray, real Serve, loopback only)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    from dgserve.cluster import api

    api.metrics_port, api.test_http_port = api.free_port(), api.free_port()
    api.start_local(num_cpus=8, metrics_interval_s=0.5, temp_dir="/tmp/dgray-tests", metrics_port=api.metrics_port,
                    http={"host": "127.0.0.1", "port": api.test_http_port},
                    resources={"dgserve_gateway": 2, "dgserve_http": 2})  # what the Helm chart's gateway pods offer
    yield api
    api.shutdown()


@pytest.fixture
def deploy(ray_cluster, tiny_dir):
    """Deploy a topology (the tiny test checkpoint unless it names a model); deleted after the test."""
    from ray import serve

    names = []

    def run(**topology):
        topology.setdefault("model", str(tiny_dir))
        topology.setdefault("name", f"t{len(names)}")
        names.append(topology["name"])
        return ray_cluster.deploy(topology)

    yield run
    for name in names:
        serve.delete(name)


def _load(folder, dtype: str):
    from dgserve.model.loader import load_checkpoint

    return load_checkpoint(folder, dtype=dtype)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return _load(tiny_dir, "float32")


@pytest.fixture(scope="session")
def tiny_bf16(tiny_dir):
    return _load(tiny_dir, "bfloat16")


@pytest.fixture(scope="session")
def confident(confident_dir):
    return _load(confident_dir, "float32")


@pytest.fixture(scope="session")
def confident_bf16(confident_dir):
    return _load(confident_dir, "bfloat16")
