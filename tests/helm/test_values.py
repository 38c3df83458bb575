"""One test per value that lands in a field: set it, render, find it where it must land."""

from __future__ import annotations

import pytest

from .chart import container, env, find, group, render, serve_config, topology

RS = "RayService"


def rs(objs):
    return find(objs, RS)["spec"]


def cluster(objs):
    return rs(objs)["rayClusterConfig"]


def gw_pod(objs):
    return group(objs, "gateway")["template"]["spec"]


def engine_pod(objs):
    return group(objs, "engine")["template"]["spec"]


def mounts(pod_spec):
    return {m["mountPath"]: m["name"] for m in pod_spec["containers"][0]["volumeMounts"]}


CASES = [
    # (values, where it lands, expected)
    ({"image": {"repository": "reg.example/dgserve", "tag": "1.2.3"}},
     lambda o: container(group(o, "engine"))["image"], "reg.example/dgserve:1.2.3"),
    ({"image": {"pullPolicy": "Always"}}, lambda o: container(group(o, "gateway"))["imagePullPolicy"], "Always"),
    ({"imagePullSecrets": [{"name": "regcred"}]}, lambda o: engine_pod(o)["imagePullSecrets"], [{"name": "regcred"}]),
    ({"fullnameOverride": "llm"}, lambda o: find(o, RS)["metadata"]["name"], "llm"),
    ({"nameOverride": "gemma"}, lambda o: (find(o, RS)["metadata"]["name"],
                                           find(o, RS)["metadata"]["labels"]["app.kubernetes.io/name"]),
     ("rel-gemma", "gemma")),
    ({"model": {"device": "cpu", "expertsDtype": "auto"}}, lambda o: topology(o)["device"], "cpu"),
    ({"engine": {"rankResources": {"experts": {"cpus": 3, "gpus": 1}}}},
     lambda o: topology(o)["resources"]["experts"], {"cpus": 3, "gpus": 1}),
    ({"gateway": {"service": {"type": "LoadBalancer"}}, "tls": {"existingSecret": "t"}},
     lambda o: (find(o, "Service", "-grpc")["spec"]["type"], "appProtocol" in find(o, "Service", "-grpc")["spec"][
         "ports"][0]), ("LoadBalancer", False)),
    ({"gateway": {"service": {"type": "NodePort", "allowPlaintextExternal": True}}},
     lambda o: find(o, "Service", "-grpc")["spec"]["type"], "NodePort"),
    ({"http": {"service": {"type": "LoadBalancer"}, "tls": True}, "tls": {"existingSecret": "t"}},
     lambda o: find(o, "Service", "-http")["spec"]["type"], "LoadBalancer"),
    ({"http": {"enabled": False}},
     lambda o: (topology(o)["http"], serve_config(o)["applications"][0]["route_prefix"],
                [x["metadata"]["name"] for x in o if x["kind"] == "Service"]), ({"enabled": False}, None,
                                                                                  ["rel-dgserve-grpc"])),
    ({"fabric": {"profile": "ib", "rdmaResource": {"name": "nvidia.com/hostdev", "quantity": 4}}},
     lambda o: container(group(o, "engine"))["resources"]["limits"]["nvidia.com/hostdev"], "4"),
    ({"model": {"id": "/models/dg"}}, lambda o: topology(o)["model"], "/models/dg"),
    ({"model": {"revision": "abc123"}}, lambda o: topology(o)["revision"], "abc123"),
    ({"model": {"dtype": "float32"}}, lambda o: topology(o)["dtype"], "float32"),
    ({"model": {"expertsDtype": "auto"}}, lambda o: topology(o)["experts_dtype"], "auto"),
    ({"model": {"offline": True}}, lambda o: env(container(group(o, "engine")))["HF_HUB_OFFLINE"], "1"),
    ({"profile": "packed"}, lambda o: topology(o)["profile"], "packed"),
    ({"engine": {"attentionRanks": 3, "expertRanks": 5}},
     lambda o: (topology(o)["attention_ranks"], topology(o)["expert_ranks"]), (3, 5)),
    ({"engine": {"expertMap": {"0": [0, 1], "1": [2, 3]}, "expertRanks": 2}},
     lambda o: topology(o)["expert_map"], {"0": [0, 1], "1": [2, 3]}),
    ({"engine": {"units": {"min": 2, "max": 4, "initial": 3}}}, lambda o: topology(o)["units"],
     {"min": 2, "max": 4, "initial": 3}),
    ({"engine": {"rankResources": {"attention": {"cpus": 6, "gpus": 1}}}},
     lambda o: topology(o)["resources"]["attention"], {"cpus": 6, "gpus": 1}),
    ({"engine": {"config": {"max_running": 48, "prefix_cache": False}}},
     lambda o: (topology(o)["engine"]["max_running"], topology(o)["engine"]["prefix_cache"]), (48, False)),
    ({"engine": {"sampler": {"max_denoising_steps": 12}}}, lambda o: topology(o)["sampler"],
     {"max_denoising_steps": 12}),
    ({"engine": {"watchdogSeconds": 45}}, lambda o: topology(o)["watchdog_s"], 45),
    ({"engine": {"serve": {"max_request_s": 300, "downscale_delay_s": 60}}},
     lambda o: (topology(o)["serve"]["downscale_delay_s"], engine_pod(o)["terminationGracePeriodSeconds"],
                serve_config(o)["http_options"]["request_timeout_s"]), (60, 370, 305)),
    ({"engine": {"serve": {"metrics_interval_s": 2}}},
     lambda o: env(container(group(o, "gateway")))["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"], "2"),
    ({"gateway": {"replicas": 3}},
     lambda o: (topology(o)["gateway"]["replicas"], topology(o)["http"]["replicas"], group(o, "gateway")["replicas"],
                group(o, "gateway")["maxReplicas"]), (3, 3, 3, 3)),
    ({"gateway": {"port": 6000}},
     lambda o: (topology(o)["gateway"]["port"], find(o, "Service", "-grpc")["spec"]["ports"][0]["port"],
                container(group(o, "gateway"))["readinessProbe"]["grpc"]["port"]), (6000, 6000, 6000)),
    ({"gateway": {"graceSeconds": 50}},
     lambda o: (topology(o)["gateway"]["grace_s"], gw_pod(o)["terminationGracePeriodSeconds"],
                container(group(o, "gateway"))["lifecycle"]["preStop"]["exec"]["command"][3]), (50, 70, "60")),
    ({"gateway": {"config": {"retry_pushback_ms": 2500}}}, lambda o: topology(o)["gateway"]["retry_pushback_ms"], 2500),
    ({"gateway": {"service": {"annotations": {"a": "b"}}}},
     lambda o: find(o, "Service", "-grpc")["metadata"]["annotations"], {"a": "b"}),
    ({"gateway": {"rayCpus": 6}}, lambda o: group(o, "gateway")["resources"]["CPU"], "6"),
    ({"gateway": {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}}},
     lambda o: container(group(o, "gateway"))["resources"]["requests"], {"cpu": "1", "memory": "16Gi"}),
    ({"gateway": {"nodeSelector": {"pool": "cpu"}}}, lambda o: gw_pod(o)["nodeSelector"], {"pool": "cpu"}),
    ({"gateway": {"tolerations": [{"key": "k", "operator": "Exists"}]}}, lambda o: gw_pod(o)["tolerations"],
     [{"key": "k", "operator": "Exists"}]),
    ({"gateway": {"affinity": {"nodeAffinity": {}}}}, lambda o: gw_pod(o)["affinity"], {"nodeAffinity": {}}),
    ({"gateway": {"pdb": {"enabled": True, "maxUnavailable": 0}}},
     lambda o: find(o, "PodDisruptionBudget", "-gateway")["spec"]["maxUnavailable"], 0),
    ({"http": {"port": 8443}},
     lambda o: (topology(o)["http"]["port"], serve_config(o)["http_options"]["port"],
                find(o, "Service", "-http")["spec"]["ports"][0]["port"]), (8443, 8443, 8443)),
    ({"http": {"routePrefix": "/openai"}},
     lambda o: (topology(o)["http"]["route_prefix"], serve_config(o)["applications"][0]["route_prefix"]),
     ("/openai", "/openai")),
    ({"http": {"servedModelName": "gemma"}}, lambda o: topology(o)["http"]["served_model_name"], "gemma"),
    ({"http": {"service": {"annotations": {"x": "z"}}}},
     lambda o: find(o, "Service", "-http")["metadata"]["annotations"], {"x": "z"}),
    ({"apiKeys": {"existingSecret": "keys", "key": "k"}},
     lambda o: (topology(o)["gateway"]["api_keys_file"], mounts(gw_pod(o))["/etc/dgserve/api-keys"],
                "/etc/dgserve/api-keys" in mounts(engine_pod(o))), ("/etc/dgserve/api-keys/k", "api-keys", False)),
    ({"tls": {"existingSecret": "tls"}},
     lambda o: (topology(o)["gateway"]["tls_cert_file"], "ssl_keyfile" in serve_config(o)["http_options"],
                mounts(engine_pod(o))["/etc/dgserve/tls"], "insecure_remote" in topology(o)["gateway"],
                find(o, "Service", "-http")["spec"]["ports"][0]["appProtocol"]),
     ("/etc/dgserve/tls/tls.crt", False, "tls", False, "http")),
    ({"tls": {"existingSecret": "tls"}, "http": {"tls": True}},
     lambda o: (serve_config(o)["http_options"]["ssl_keyfile"], find(o, "Service", "-http")["spec"]["ports"][0][
         "appProtocol"]), ("/etc/dgserve/tls/tls.key", "https")),
    ({"podSecurityContext": {"fsGroup": 2000, "runAsNonRoot": True}},
     lambda o: (engine_pod(o)["securityContext"], gw_pod(o)["securityContext"]["fsGroup"],
                cluster(o)["headGroupSpec"]["template"]["spec"]["securityContext"]["fsGroup"]),
     ({"fsGroup": 2000, "runAsNonRoot": True}, 2000, 2000)),
    ({"tls": {"existingSecret": "tls", "serverName": "dg.example"}},
     lambda o: container(group(o, "gateway"))["readinessProbe"]["exec"]["command"][-2], "dg.example"),
    ({"tls": {"existingSecret": "tls", "clientCaSecret": "ca"}, "http": {"enabled": False}},
     lambda o: (topology(o)["gateway"]["tls_client_ca_file"], mounts(gw_pod(o))["/etc/dgserve/client-ca"]),
     ("/etc/dgserve/client-ca/ca.crt", "client-ca")),
    ({"hfToken": {"existingSecret": "hf", "key": "token"}},
     lambda o: env(container(group(o, "engine")))["HF_TOKEN"], {"secretKeyRef": {"name": "hf", "key": "token"}}),
    ({"rayAuth": {"enabled": True, "existingSecret": "ray-token"}}, lambda o: cluster(o)["authOptions"],
     {"mode": "token", "secretName": "ray-token"}),
    ({"rayAuth": {"enabled": False}}, lambda o: "authOptions" in cluster(o), False),
    ({"modelCache": {"mountPath": "/cache"}},
     lambda o: (mounts(engine_pod(o))["/cache"], env(container(group(o, "engine")))["HF_HOME"]),
     ("model-cache", "/cache/huggingface")),
    ({"modelCache": {"existingClaim": "weights"}},
     lambda o: (engine_pod(o)["volumes"][0]["persistentVolumeClaim"]["claimName"],
                [x["kind"] for x in o].count("PersistentVolumeClaim")), ("weights", 0)),
    ({"modelCache": {"create": {"size": "1Ti", "storageClass": "fast", "accessModes": ["ReadOnlyMany"]}}},
     lambda o: (lambda s: (s["resources"]["requests"]["storage"], s["storageClassName"], s["accessModes"]))(
         find(o, "PersistentVolumeClaim")["spec"]), ("1Ti", "fast", ["ReadOnlyMany"])),
    ({"modelCache": {"create": {"enabled": False}}}, lambda o: engine_pod(o)["volumes"][0], {"name": "model-cache",
                                                                                           "emptyDir": {}}),
    ({"extraEnv": [{"name": "FOO", "value": "bar"}]}, lambda o: env(container(group(o, "gateway")))["FOO"], "bar"),
    ({"head": {"rayStartParams": {"num-cpus": "2"}}},
     lambda o: cluster(o)["headGroupSpec"]["rayStartParams"]["num-cpus"], "2"),
    ({"head": {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}}}},
     lambda o: cluster(o)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"],
     {"cpu": "2", "memory": "16Gi"}),
    ({"head": {"nodeSelector": {"pool": "system"}}},
     lambda o: cluster(o)["headGroupSpec"]["template"]["spec"]["nodeSelector"], {"pool": "system"}),
    ({"head": {"tolerations": [{"key": "sys", "operator": "Exists"}]}},
     lambda o: cluster(o)["headGroupSpec"]["template"]["spec"]["tolerations"], [{"key": "sys", "operator": "Exists"}]),
    ({"head": {"affinity": {"podAffinity": {}}}},
     lambda o: cluster(o)["headGroupSpec"]["template"]["spec"]["affinity"], {"podAffinity": {}}),
    ({"workerGroups": {"engine": {"replicas": 2, "minReplicas": 2, "maxReplicas": 5}}},
     lambda o: tuple(group(o, "engine")[k] for k in ("replicas", "minReplicas", "maxReplicas")), (2, 2, 5)),
    ({"workerGroups": {"engine": {"gpus": 4}}, "engine": {"attentionRanks": 1, "expertRanks": 3}},
     lambda o: container(group(o, "engine"))["resources"]["limits"]["nvidia.com/gpu"], "4"),
    ({"workerGroups": {"engine": {"rayCpus": 64}}}, lambda o: group(o, "engine")["rayStartParams"]["num-cpus"], "64"),
    ({"workerGroups": {"engine": {"resources": {"requests": {"memory": "900Gi"}}}}},
     lambda o: container(group(o, "engine"))["resources"]["requests"]["memory"], "900Gi"),
    ({"workerGroups": {"engine": {"idleTimeoutSeconds": 1200}}}, lambda o: group(o, "engine")["idleTimeoutSeconds"],
     1200),
    ({"workerGroups": {"engine": {"nodeSelector": {"gpu": "h100"}}}}, lambda o: engine_pod(o)["nodeSelector"],
     {"gpu": "h100"}),
    ({"workerGroups": {"engine": {"tolerations": []}}}, lambda o: "tolerations" in engine_pod(o), False),
    ({"workerGroups": {"engine": {"affinity": {"nodeAffinity": {}}}}}, lambda o: engine_pod(o)["affinity"],
     {"nodeAffinity": {}}),
    ({"workerGroups": {"engine": {"pdb": {"enabled": False, "maxUnavailable": 1}}}},
     lambda o: [p["metadata"]["name"] for p in o if p["kind"] == "PodDisruptionBudget"], ["rel-dgserve-gateway"]),
    ({"rayService": {"rayVersion": "2.61.0"}}, lambda o: cluster(o)["rayVersion"], "2.61.0"),
    ({"rayService": {"upgradeStrategy": "NewCluster"}}, lambda o: rs(o)["upgradeStrategy"], {"type": "NewCluster"}),
    ({"rayService": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
        "gatewayClassName": "istio", "stepSizePercent": 10, "intervalSeconds": 30, "maxSurgePercent": 20}}},
     lambda o: rs(o)["upgradeStrategy"]["clusterUpgradeOptions"]["maxSurgePercent"], 20),
    ({"rayService": {"initializingTimeout": "90m"}},
     lambda o: find(o, RS)["metadata"]["annotations"]["ray.io/initializing-timeout"], "90m"),
    ({"rayService": {"autoscaler": {"enabled": True, "upscalingMode": "Conservative", "idleTimeoutSeconds": 120}}},
     lambda o: (cluster(o)["enableInTreeAutoscaling"], cluster(o)["autoscalerOptions"]),
     (True, {"version": "v2", "upscalingMode": "Conservative", "idleTimeoutSeconds": 120})),
    ({"rayService": {"autoscaler": {"enabled": False}}},
     lambda o: (cluster(o)["enableInTreeAutoscaling"], "autoscalerOptions" in cluster(o)), (False, False)),
    ({"fabric": {"profile": "ib"}},
     lambda o: (env(container(group(o, "engine")))["NCCL_IB_HCA"],
                container(group(o, "engine"))["resources"]["limits"]["rdma/ib"],
                container(group(o, "engine"))["securityContext"]["capabilities"]["add"]), ("mlx5", "1", ["IPC_LOCK"])),
    ({"fabric": {"profile": "roce", "networks": "roce-p2", "rdmaResource": {"quantity": 2}}},
     lambda o: (group(o, "engine")["template"]["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"],
                container(group(o, "engine"))["resources"]["requests"]["rdma/roce_gdr"],
                env(container(group(o, "engine")))["NCCL_IB_GID_INDEX"]), ("roce-p2", "2", "3")),
    ({"fabric": {"profile": "tcp", "env": {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth1"}}},
     lambda o: (env(container(group(o, "engine")))["NCCL_DEBUG"], env(container(group(o, "engine")))[
         "NCCL_SOCKET_IFNAME"], env(container(group(o, "engine")))["NCCL_IB_DISABLE"],
                "NCCL_DEBUG" in env(container(group(o, "gateway")))), ("INFO", "eth1", "1", False)),
    ({"monitoring": {"podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}}},
     lambda o: (find(o, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["interval"],
                find(o, "PodMonitor")["metadata"]["labels"]["release"]), ("15s", "prom")),
    ({"monitoring": {"serviceMonitor": {"enabled": True, "interval": "20s", "labels": {"team": "llm"}}}},
     lambda o: (find(o, "ServiceMonitor")["spec"]["endpoints"][0]["interval"],
                find(o, "ServiceMonitor")["metadata"]["labels"]["team"],
                find(o, "Service", "-metrics")["spec"]["clusterIP"]), ("20s", "llm", "None")),
    ({"monitoring": {"metricsPort": 9100}},
     lambda o: (cluster(o)["headGroupSpec"]["rayStartParams"]["metrics-export-port"],
                group(o, "engine")["rayStartParams"]["metrics-export-port"]), ("9100", "9100")),
    ({"monitoring": {"grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "yes"}}}},
     lambda o: (find(o, "ConfigMap", "-dashboard")["metadata"]["labels"]["grafana_dashboard"],
                '"uid": "dgserve-overview"' in find(o, "ConfigMap", "-dashboard")["data"]["dgserve.json"]),
     ("yes", True)),
    ({"networkPolicy": {"enabled": False}}, lambda o: [x for x in o if x["kind"] == "NetworkPolicy"], []),
    ({"networkPolicy": {"metricsFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]}},
     lambda o: find(o, "NetworkPolicy")["spec"]["ingress"][3]["from"],
     [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]),
    ({"networkPolicy": {"operatorNamespace": "kuberay"}},
     lambda o: find(o, "NetworkPolicy")["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"],
     {"kubernetes.io/metadata.name": "kuberay"}),
    ({"networkPolicy": {"operatorPodLabels": {"app.kubernetes.io/name": None, "app": "ray-operator"}}},
     lambda o: find(o, "NetworkPolicy")["spec"]["ingress"][1]["from"][0],
     {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "ray-operator"}}}),
    ({"fabricCheck": {"enabled": True, "image": "kubectl:9", "binary": "/bin/a2a", "minBytes": "1M",
                      "maxBytes": "2G", "minBusbwGBps": 77, "timeoutSeconds": 99}},
     lambda o: (lambda j, c: (c["image"], j["spec"]["activeDeadlineSeconds"],
                              "/bin/a2a -b 1M -e 2G -f 2 -g 8" in c["args"][0], "-v t=77" in c["args"][0]))(
         find(o, "Job"), find(o, "Job")["spec"]["template"]["spec"]["containers"][0]),
     ("kubectl:9", 99, True, True)),
]


@pytest.mark.parametrize(("values", "where", "expected"), CASES,
                         ids=[str(next(iter(c[0].items())))[:60] for c in CASES])
def test_a_value_lands_in_its_field(values, where, expected):
    assert where(render(values)) == expected


def test_disaggregated_groups_carry_the_ray_labels_the_topology_places_ranks_by():
    objs = render({"profile": "disaggregated", "engine": {"attentionRanks": 4, "expertRanks": 8},
                   "workerGroups": {"attention": {"gpus": 4}, "expert": {"maxReplicas": 3}}})
    assert container(group(objs, "attention"))["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert group(objs, "expert")["maxReplicas"] == 3 and "engine" not in str(
        [g["groupName"] for g in cluster(objs)["workerGroupSpecs"]])
    labels = topology(objs)["node_labels"]
    assert group(objs, "attention")["labels"] == labels["attention"] == {"dgserve.io/role": "attention"}
    assert group(objs, "expert")["labels"] == labels["experts"] == {"dgserve.io/role": "expert"}
    names = [g["groupName"] for g in cluster(objs)["workerGroupSpecs"]]
    assert names == ["gateway", "attention", "expert"]


def test_the_gateway_services_select_the_pods_running_one_gateway_each():
    objs = render()
    gw = group(objs, "gateway")
    labels = gw["template"]["metadata"]["labels"]
    for svc in ("-grpc", "-http"):
        assert set(find(objs, "Service", svc)["spec"]["selector"].items()) <= set(labels.items())
    assert find(objs, "Service", "-grpc")["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert gw["resources"] == {"CPU": "4", "GPU": "0", "dgserve_gateway": "1", "dgserve_http": "1"}
    assert topology(objs)["gateway"]["ray_resources"] == {"dgserve_gateway": 1}
    assert topology(objs)["http"]["ray_resources"] == {"dgserve_http": 1}
    cmd = container(gw)["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[-1] == topology(objs)["gateway"]["drain_file"] and cmd.count("--front") == 2  # gateway and http
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        assert "ray.io/group" in pdb["spec"]["selector"]["matchLabels"]
        assert "ray.io/cluster" not in pdb["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_unit_pods_drain_within_their_grace_period():
    objs = render({"engine": {"serve": {"max_request_s": 600, "graceful_shutdown_timeout_s": 700}}})
    pod = engine_pod(objs)
    cmd = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[:3] == ["dgserve", "drain-pod", "--ray"]
    assert 700 < int(cmd[cmd.index("--grace") + 1]) < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("profile", ["packed", "disaggregated"])
def test_no_group_sets_ray_resources_in_both_places_and_gpu_pods_probe_their_ray_node(profile):
    """KubeRay refuses a group with Ray resources both in `resources` and in rayStartParams; a GPU pod is ready
    when its Ray node is (not its Serve proxy, which an idle pod does not have)."""
    objs = render({"profile": profile})
    for g in cluster(objs)["workerGroupSpecs"]:
        both = set(g.get("resources", {})) & {"CPU", "GPU"} and {"num-cpus", "num-gpus"} & set(g["rayStartParams"])
        assert not both, g["groupName"]
        if g["groupName"] != "gateway":
            assert container(g)["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
