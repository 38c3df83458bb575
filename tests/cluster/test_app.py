"""The Serve application builder a RayService's serveConfigV2 names (cluster/app.py): its args are checked by the
builder's model and the project's topology loader, the config passes Ray's own schema, and a local `serve.run` of
it on CPU serves the endpoint."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from dgserve.cluster.api import free_port
from dgserve.cluster.app import IMPORT_PATH, build, serve_application
from dgserve.model.errors import ConfigError


def test_args_are_the_topology_and_nothing_else():
    with pytest.raises(ValidationError, match="topolgy"):
        call_user_app_builder_with_args_if_necessary(build, {"topolgy": {}})
    with pytest.raises(ConfigError, match="engine.max_running"):
        call_user_app_builder_with_args_if_necessary(build, {"topology": {"engine": {"max_running": 0}}})
    assert serve_application({"http": {"enabled": False}}) == {
        "name": "dgserve", "import_path": IMPORT_PATH, "args": {"topology": {"http": {"enabled": False}}},
        "route_prefix": None}
    assert serve_application({})["route_prefix"] == "/"


def test_the_helm_charts_serve_config_runs_locally_and_serves(ray_cluster, tiny_dir, tmp_path):
    """The serveConfigV2 the Helm chart renders (its minimal CPU values, the tiny checkpoint, gRPC only), run the
    way KubeRay runs it: Ray's schema, the builder named by import_path with the rendered args, serve.run. Only the
    gateway's host (0.0.0.0 in a pod, loopback here) and its drain file's folder are changed. The test cluster
    offers the custom resources the chart's gateway pods do (dgserve_gateway), which place the gateway. Then the
    pod's preStop drain: the gateway drains when its file appears and reports."""
    from ray import serve
    from ray._common.utils import import_attr

    from dgserve.cluster.drain import request
    from dgserve_client import Client
    from dgserve_client.errors import Unavailable
    from tests.helm.chart import CHART, render, serve_config

    port = free_port()
    objects = render({"model": {"id": str(tiny_dir)}, "http": {"enabled": False}, "gateway": {"port": port}},
                     files=(CHART / "ci" / "minimal-cpu-values.yaml",))
    raw = serve_config(objects)
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    args = app.args
    assert args["topology"]["gateway"]["host"] == "0.0.0.0" and args["topology"]["gateway"]["ray_resources"]
    args["topology"]["gateway"]["host"] = "127.0.0.1"
    assert args["topology"]["gateway"]["drain_file"] == "/tmp/dgserve/drain"
    args["topology"]["gateway"]["drain_file"] = drain = str(tmp_path / "drain")
    args["topology"]["name"] = name = "helm-app-test"
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), args)
    serve.run(built, name=name, route_prefix=app.route_prefix)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            t0 = time.monotonic()
            while c.health() != "SERVING" and time.monotonic() - t0 < 120:
                time.sleep(0.2)
            r = c.generate(token_ids=[5, 6, 7], seed=1, max_new_tokens=32, max_denoising_steps=2)
            info = c.info()
        assert len(r.token_ids) == 32 and info.model_id == str(tiny_dir) and info.vision.max_frames == 32
        assert app.route_prefix is None  # gRPC only: no HTTP route
        assert request(drain, 30) == {"gateway": {"failed": []}}  # what `dgserve drain-pod --gateway-file` waits for
        with Client(f"127.0.0.1:{port}") as c, pytest.raises(Unavailable):  # drained: the gRPC server stopped
            c.health()
    finally:
        serve.delete(name)
