"""Every values file in helm/dgserve/ci: `helm lint --strict`, `helm template`, and every rendered object
validated strictly: built-in kinds by kubernetes-validate, the RayService and the monitors by their CRD schemas,
serveConfigV2 by Ray's Serve schema (plus the checks it lacks) and by dgserve's own topology loader."""

from __future__ import annotations

import jsonschema
import pytest
import yaml
from kubernetes_validate import validate as k8s_validate
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from dgserve.cluster.app import AppArgs
from dgserve.cluster.config import parse_topology

from .chart import CI_VALUES, CRDS, KUBE_VERSION, crd_schema, lint, render, serve_config

CRD_KINDS = ("RayService", "PodMonitor", "ServiceMonitor")
IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


@pytest.fixture(scope="module", params=CI_VALUES, ids=IDS)
def rendered(request):
    return request.param, render(files=(request.param,))


def test_the_ci_values_cover_every_profile_and_fabric():
    assert {"default", "minimal-cpu", "replicated", "packed", "disaggregated", "ib", "roce", "units"} <= set(IDS)


@pytest.mark.parametrize("values", CI_VALUES, ids=IDS)
def test_lint_strict_passes(values):
    assert "0 chart(s) failed" in lint((values,))


def test_every_built_in_object_is_valid_strictly(rendered):
    _, objects = rendered
    builtin = [o for o in objects if o["kind"] not in CRD_KINDS]
    assert builtin
    for obj in builtin:
        k8s_validate(obj, KUBE_VERSION, strict=True)


def test_custom_resources_are_valid_against_their_crds_strictly(rendered):
    _, objects = rendered
    custom = [o for o in objects if o["kind"] in CRD_KINDS]
    assert any(o["kind"] == "RayService" for o in custom)
    if crd_schema("RayService") is None:
        pytest.skip(f"CRD schemas not found at {CRDS} (set DGSERVE_CRDS): the strict CRD checks did not run")
    for obj in custom:
        jsonschema.Draft7Validator(crd_schema(obj["kind"])).validate(obj)


def test_serve_config_passes_rays_schema_and_dgserves_loader(rendered):
    _, objects = rendered
    raw = serve_config(objects)
    config = ServeDeploySchema.model_validate(raw)
    assert config.proxy_location == "EveryNode" and config.http_options.host == "0.0.0.0"
    (app,) = config.applications
    assert app.import_path == "dgserve.cluster.app:build"
    for d in raw["applications"][0].get("deployments", []):
        assert set(d) <= set(DeploymentSchema.model_fields), d
        if "autoscaling_config" in d:
            AutoscalingConfig(**d["autoscaling_config"])
    topo = parse_topology(AppArgs(**app.args).topology)
    assert topo.gateway.host == "0.0.0.0" and topo.gateway.ray_resources == {"dgserve_gateway": 1.0}
    if topo.http.enabled:  # one ingress beside each gateway
        assert topo.http.replicas == topo.gateway.replicas and topo.http.ray_resources == {"dgserve_http": 1.0}
    assert app.route_prefix == (topo.http.route_prefix if topo.http.enabled else None)


def test_the_units_autoscaling_config_is_one_ray_accepts(rendered):
    """What Serve will build from the topology: the engine unit's options pass Ray's own checks."""
    from dgserve.cluster.units import unit_deployment

    _, objects = rendered
    topo = parse_topology(serve_config(objects)["applications"][0]["args"]["topology"])
    d = unit_deployment(topo)
    if topo.units.max > topo.units.min:
        cfg = d._deployment_config.autoscaling_config
        assert (cfg.min_replicas, cfg.max_replicas) == (topo.units.min, topo.units.max)
    else:
        assert d.num_replicas == topo.units.min


def test_the_rendered_yaml_is_plain_documents(rendered):
    values, objects = rendered
    assert all({"apiVersion", "kind", "metadata"} <= set(o) for o in objects), values
    assert yaml.safe_load(yaml.safe_dump(objects)) == objects
