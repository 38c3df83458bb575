"""The Serve application builder a RayService's serveConfigV2 names (cluster/app.py): its args are checked by the
builder's model and the project's topology loader, the config passes Ray's own schema, and a local `serve.run` of
it on CPU serves the endpoint."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from dgserve.cluster.api import free_port
from dgserve.cluster.app import IMPORT_PATH, build, serve_application
from dgserve.model.errors import ConfigError


def test_args_are_the_topology_and_nothing_else():
    with pytest.raises(ValidationError, match="topolgy"):
        call_user_app_builder_with_args_if_necessary(build, {"topolgy": {}})
    with pytest.raises(ConfigError, match="engine.max_running"):
        call_user_app_builder_with_args_if_necessary(build, {"topology": {"engine": {"max_running": 0}}})
    assert serve_application({"http": {"enabled": False}}) == {
        "name": "dgserve", "import_path": IMPORT_PATH, "args": {"topology": {"http": {"enabled": False}}}}
    assert serve_application({})["route_prefix"] == "/"


def test_a_serve_config_of_the_builder_runs_locally_and_serves(ray_cluster, tiny_dir):
    from ray import serve
    from ray._common.utils import import_attr

    from dgserve_client import Client

    port = free_port()
    topology = {"name": "app-test", "model": str(tiny_dir), "gateway": {"port": port}, "http": {"enabled": False}}
    config = ServeDeploySchema.model_validate({"applications": [serve_application(topology, "app-test")]})
    for app in config.applications:
        for d in app.deployments:
            assert set(d.model_dump(exclude_unset=True)) <= set(DeploymentSchema.model_fields)
        built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        serve.run(built, name=app.name, route_prefix=app.route_prefix)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            t0 = time.monotonic()
            while c.health() != "SERVING" and time.monotonic() - t0 < 120:
                time.sleep(0.2)
            r = c.generate(token_ids=[5, 6, 7], seed=1, max_new_tokens=32, max_denoising_steps=2)
            info = c.info()
        assert len(r.token_ids) == 32 and info.model_id == str(tiny_dir) and info.vision.max_frames == 32
    finally:
        serve.delete("app-test")
