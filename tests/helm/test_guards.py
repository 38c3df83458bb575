"""Bad values never render: the schema refuses unknown keys and bad types, and the chart's `fail` guards refuse
combinations the schema cannot express, each with a message that names the values to change."""

from __future__ import annotations

import pytest

from .chart import HelmError, render

CPU = {"model": {"device": "cpu", "expertsDtype": "auto"}, "profile": "replicated",
       "engine": {"expertRanks": 0, "attentionRanks": 1, "rankResources": {"attention": {"cpus": 1, "gpus": 0}}},
       "workerGroups": {"engine": {"gpus": 0}}}

GUARDS = [
    ({"model": {"device": "cpu"}, "workerGroups": {"engine": {"gpus": 0}}},
     "model.expertsDtype fp8 needs GPUs where the experts run"),
    ({"engine": {"rankResources": {"experts": {"cpus": 4, "gpus": 0}}}},
     "engine.rankResources.experts.gpus > 0 (is 0)"),
    ({"profile": "disaggregated", "workerGroups": {"expert": {"gpus": 0}}}, "workerGroups.expert.gpus > 0 (is 0)"),
    ({"workerGroups": {"engine": {"minReplicas": 3, "maxReplicas": 2}}},
     "workerGroups.engine.minReplicas (3) is above maxReplicas (2)"),
    ({"workerGroups": {"engine": {"replicas": 9}}}, "workerGroups.engine.replicas (9) is outside"),
    ({"engine": {"units": {"min": 5, "max": 4}}}, "engine.units.min (5) is above engine.units.max (4)"),
    ({"profile": "disaggregated", "workerGroups": {"expert": None}}, "profile disaggregated needs workerGroups.expert"),
    ({"profile": "packed", "workerGroups": {"engine": None}}, "profile packed needs workerGroups.engine"),
    ({"profile": "replicated"}, "engine.expertRanks must be 0"),
    ({"engine": {"expertRanks": 0}}, "engine.expertRanks must be at least 1"),
    ({"workerGroups": {"engine": {"gpus": 4}}}, "its ranks take 8 GPUs but workerGroups.engine.gpus is 4"),
    ({"workerGroups": {"engine": {"rayCpus": 16}}}, "ranks and replica take 41 Ray CPUs"),
    ({**CPU, "model": {"device": "cuda", "expertsDtype": "auto"}}, "model.device cuda needs GPUs"),
    ({"tls": {"existingSecret": "t", "clientCaSecret": "ca"}}, "tls.clientCaSecret (client certificates) needs "
                                                               "http.enabled false"),
    ({"tls": {"clientCaSecret": "ca"}, "http": {"enabled": False}}, "tls.clientCaSecret needs tls.existingSecret"),
    ({"gateway": {"service": {"type": "LoadBalancer"}}}, "gateway.service.type LoadBalancer exposes the endpoint"),
    ({"http": {"service": {"type": "NodePort"}}}, "http.service.type NodePort exposes the HTTP API"),
    ({"tls": {"existingSecret": "t"}, "http": {"service": {"type": "NodePort"}}},
     "http.service.type NodePort exposes the HTTP API"),  # gRPC's TLS is not the HTTP proxy's
    ({"http": {"tls": True}}, "http.tls needs tls.existingSecret"),
    ({"http": {"port": 8080}}, "http.port and monitoring.metricsPort are both 8080"),
    ({"gateway": {"port": 8265}}, "gateway.port 8265 is one of Ray's ports"),
    ({"fabric": {"profile": "roce"}}, "fabric.profile roce needs fabric.networks"),
    ({"engine": {"units": {"min": 1, "max": 5}}}, "engine.units.max (5) is more units than workerGroups.engine can "
                                                  "hold: 4 pods x 1 units per pod"),
    ({"rayService": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade", "autoscaler": {"enabled": False},
                     "clusterUpgradeOptions": {"gatewayClassName": "g", "stepSizePercent": 10,
                                               "intervalSeconds": 30}}}, "needs rayService.autoscaler.enabled"),
    ({"rayService": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade",
                     "clusterUpgradeOptions": {"gatewayClassName": "g"}}}, "needs rayService.clusterUpgradeOptions"),
    ({**CPU, "fabricCheck": {"enabled": True}}, "fabricCheck.enabled runs NCCL on the GPU worker pods"),
    ({"fabricCheck": {"enabled": True, "crossPod": {"group": "expert"}}},
     "fabricCheck.crossPod.group expert is not a GPU group of profile packed (engine)"),
    ({"rayService": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade"}}, "needs rayService.clusterUpgradeOptions"),
]


def test_the_cpu_values_the_guards_start_from_render():
    assert render(CPU)


@pytest.mark.parametrize(("values", "message"), GUARDS, ids=[m[:50] for _, m in GUARDS])
def test_a_bad_combination_fails_naming_what_to_change(values, message):
    with pytest.raises(HelmError) as e:
        render(values)
    assert message in str(e.value)


SCHEMA = [
    ({"gatway": {}}, "additional properties 'gatway' not allowed"),
    ({"gateway": {"replica": 2}}, "additional properties 'replica' not allowed"),
    ({"engine": {"config": {"max_runing": 8}}}, "additional properties 'max_runing' not allowed"),
    ({"engine": {"serve": {"upscale_delay": 5}}}, "additional properties 'upscale_delay' not allowed"),
    ({"engine": {"sampler": {"temperature": 0.7}}}, "additional properties 'temperature' not allowed"),
    ({"profile": "sideways"}, "/profile"),
    ({"model": {"expertsDtype": "int4"}}, "/model/expertsDtype"),
    ({"fabric": {"profile": "efa"}}, "/fabric/profile"),
    ({"workerGroups": {"engine": {"gpus": 32}}}, "/workerGroups/engine"),
    ({"gateway": {"port": 70000}}, "/gateway/port"),
    ({"http": {"routePrefix": "v1/"}}, "/http/routePrefix"),
    ({"rayService": {"upgradeStrategy": "BlueGreen"}}, "/rayService/upgradeStrategy"),
    ({"gateway": {"rayCpus": 0.5}}, "/gateway/rayCpus"),  # ray start takes whole CPUs
]


@pytest.mark.parametrize(("values", "message"), SCHEMA, ids=[m[:40] for _, m in SCHEMA])
def test_the_schema_refuses_unknown_keys_and_bad_values(values, message):
    with pytest.raises(HelmError) as e:
        render(values)
    assert "values don't meet the specifications of the schema" in str(e.value) and message in str(e.value)


def test_the_schema_knows_every_key_of_the_topology_sections_it_passes_through():
    """values.schema.json's engine.config, engine.serve and engine.sampler are the topology's sections: a key
    added to the engine must be added to the chart too (this fails until it is)."""
    import json
    from dataclasses import fields

    from dgserve.cluster.config import ServeSettings
    from dgserve.cluster.engine.config import EngineConfig
    from dgserve.model.settings import KNOBS

    from .chart import CHART

    engine = json.loads((CHART / "values.schema.json").read_text())["properties"]["engine"]["properties"]
    assert set(engine["config"]["properties"]) == {f.name for f in fields(EngineConfig)}
    assert set(engine["serve"]["properties"]) == {f.name for f in fields(ServeSettings)}
    assert set(engine["sampler"]["properties"]) == set(KNOBS)


def test_a_closed_http_service_type_does_not_matter_with_http_off():
    assert render({"http": {"enabled": False, "service": {"type": "NodePort"}}})
