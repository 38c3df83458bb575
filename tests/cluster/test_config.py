"""The topology file: parsing, validation errors that name the field, and the Serve deployment it sizes."""

from __future__ import annotations

import pytest

from dgserve.cluster.config import load_topology, parse_topology, topology_from_dict
from dgserve.cluster.units import unit_deployment
from dgserve.model.errors import ConfigError

FULL = """
name: prod
model: google/diffusiongemma-26B-A4B-it
revision: main
dtype: bfloat16
experts_dtype: fp8
device: cuda
profile: replicated
units: {min: 1, max: 4, initial: 2}
attention_ranks: 2
resources:
  attention: {cpus: 8, gpus: 1}
node_labels:
  attention: {role: attention}
engine: {max_running: 32, max_queued: 64, memory_budget_bytes: 60000000000, prefill_chunk: 2048,
         max_prefill_tokens: 8192}
sampler: {max_new_tokens: 512, max_denoising_steps: 16}
watchdog_s: 20
serve: {upscale_delay_s: 5, downscale_delay_s: 120, max_request_s: 900}
"""


def test_a_full_topology_file_parses_and_round_trips(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text(FULL)
    t = load_topology(f)
    assert (t.name, t.dtype, t.attention_ranks, t.units.max, t.engine.max_running) == ("prod", "bfloat16", 2, 4, 32)
    assert t.experts_dtype == "fp8"
    assert t.resources["attention"].gpus == 1 and t.node_labels["attention"] == {"role": "attention"}
    assert t.sampler == {"max_new_tokens": 512, "max_denoising_steps": 16}
    assert topology_from_dict(t.to_dict()) == t
    # Serve sizing follows the unit's capacity, not Serve's defaults (5 ongoing, 20 s grace).
    assert t.max_ongoing == 2 * (32 + 64) and t.running_capacity == 64 and t.graceful_shutdown_s == 910


def test_the_deployment_is_sized_from_the_topology(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text(FULL)
    opts = unit_deployment(load_topology(f))._deployment_config
    d = unit_deployment(load_topology(f))
    assert opts.max_ongoing_requests == 192 and opts.graceful_shutdown_timeout_s == 910
    assert opts.max_queued_requests == 192  # a bounded wait per caller: one unit's max_ongoing_requests
    auto = opts.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.initial_replicas) == (1, 4, 2)
    assert auto.target_ongoing_requests == 64 and auto.upscale_delay_s == 5 and auto.downscale_delay_s == 120
    rc = d._replica_config
    assert rc.placement_group_bundles == [{"CPU": 0.1}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert rc.placement_group_strategy == "PACK"
    assert rc.placement_group_bundle_label_selector == [{}, {"role": "attention"}, {"role": "attention"}]


def test_a_fixed_number_of_units_has_no_autoscaling():
    d = unit_deployment(parse_topology({"units": {"min": 3, "max": 3}}))
    assert d._deployment_config.autoscaling_config is None and d._deployment_config.num_replicas == 3


def test_the_wait_queue_bound_is_configurable():
    d = unit_deployment(parse_topology({"serve": {"max_queued_requests": 5}}))
    assert d._deployment_config.max_queued_requests == 5


@pytest.mark.parametrize(("raw", "field", "allowed"), [
    ({"units": {"min": 3, "max": 2}}, "units.max", "3..1000"),
    ({"units": {"min": 1, "max": 2, "initial": 5}}, "units.initial", "1..2"),
    ({"attention_ranks": 0}, "attention_ranks", "1..1024"),
    ({"expert_ranks": 2}, "expert_ranks", "replicated"),
    ({"profile": "packed"}, "expert_ranks", ">= 1 with profile packed"),
    ({"profile": "sideways"}, "profile", "replicated | packed | disaggregated"),
    ({"dtype": "float16"}, "dtype", "float32 | bfloat16"),
    ({"experts_dtype": "int4"}, "experts_dtype", "auto | fp8"),
    ({"engine": {"max_running": 0}}, "engine.max_running", "1..4096"),
    ({"engine": {"bogus": 1}}, "engine.bogus", "a key in"),
    ({"engine": {"expert_exchange": "padded"}}, "engine.expert_exchange", "variable | fixed"),
    ({"engine": {"sampler": "fast"}}, "engine.sampler", "auto | exact | fused"),
    ({"resources": {"attention": {"gpus": -1}}}, "resources.attention.gpus", "0..16"),
    ({"node_labels": {"attention": {"role": 3}}}, "node_labels.attention", "strings"),
    ({"sampler": {"temperature": 1}}, "sampler.temperature", "a key in"),
    ({"watchdog_s": 0}, "watchdog_s", "0.1..3600"),
    ({"serve": {"upscale_delay_s": -1}}, "serve.upscale_delay_s", ">= 0"),
    ({"serve": {"graceful_shutdown_timeout_s": 5}}, "serve.graceful_shutdown_timeout_s", "max_request_s"),
    ({"serve": {"max_queued_requests": 0}}, "serve.max_queued_requests", "1..1000000"),
    ({"gateway": {"retry_pushback_ms": 1.5}}, "gateway.retry_pushback_ms", "0..3600000"),
    ({"gateway": {"probe_period_s": 0}}, "gateway.probe_period_s", "0.1..60"),
    ({"profile": "packed", "expert_ranks": 2, "expert_map": {0: [1]}}, "expert_map", "one key per expert rank"),
    ({"profile": "packed", "expert_ranks": 1, "expert_map": {0: []}}, "expert_map.0", "non-empty list"),
    ({"gateway": {"replicas": 0}}, "gateway.replicas", "1..1000"),
    ({"gateway": {"ray_resources": {"GPU": 1}}}, "gateway.ray_resources", "custom Ray resource"),
    ({"http": {"ray_resources": {"dgserve_http": 0}}}, "http.ray_resources", "(0, 1000]"),
    ({"gateway": {"drain_file": ""}}, "gateway.drain_file", "a file path"),
    ({"modle": "x"}, "modle", "a key in"),
    ([1, 2], "", "a mapping"),
])
def test_errors_name_the_field_the_value_and_the_allowed_range(raw, field, allowed):
    with pytest.raises(ConfigError) as e:
        parse_topology(raw)
    assert e.value.field == field and allowed in e.value.allowed and str(e.value).startswith("topology: invalid")


def test_unreadable_or_invalid_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="readable YAML"):
        load_topology(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("units: {min: 1\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_topology(bad)


@pytest.mark.parametrize(("name", "profile", "experts"), [
    ("local.yaml", "replicated", 0), ("h100-replicated.yaml", "replicated", 0), ("local-packed.yaml", "packed", 2),
    ("h100-packed.yaml", "packed", 6), ("h100-disaggregated.yaml", "disaggregated", 8)])
def test_shipped_topologies_are_valid(name, profile, experts):
    from pathlib import Path

    import dgserve.cluster

    t = load_topology(Path(dgserve.cluster.__file__).parent / "topologies" / name)
    assert t.name == "dgserve" and t.profile == profile and t.expert_ranks == experts


def test_a_packed_unit_reserves_a_bundle_per_attention_and_expert_rank():
    from pathlib import Path

    t = load_topology(Path(__file__).parents[2] / "cluster" / "topologies" / "h100-disaggregated.yaml")
    assert (t.attention_ranks, t.expert_ranks, t.world) == (4, 8, 12)
    rc = unit_deployment(t)._replica_config
    attention, experts = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}
    assert rc.placement_group_bundles == [{"CPU": 0.1}] + [attention] * 4 + [experts] * 8
    assert rc.placement_group_bundle_label_selector == [{}] + [{"role": "attention"}] * 4 + [{"role": "experts"}] * 8
    assert rc.placement_group_strategy == "SPREAD"
    packed = unit_deployment(parse_topology({"profile": "packed", "expert_ranks": 2}))._replica_config
    assert packed.placement_group_strategy == "STRICT_PACK" and len(packed.placement_group_bundles) == 4


def test_an_explicit_expert_map_is_checked_against_the_checkpoint_before_deploying():
    """The tiny model has 8 experts: a map must name each once (the unit's ranks then hold those)."""
    ok = parse_topology({"profile": "packed", "expert_ranks": 2, "expert_map": {0: [7], 1: [0, 1, 2, 3, 4, 5, 6]}})
    assert unit_deployment(ok)._replica_config.placement_group_strategy == "STRICT_PACK"
    bad = parse_topology({"profile": "packed", "expert_ranks": 2, "expert_map": {0: [0, 1], 1: [2, 3]}})
    with pytest.raises(ConfigError, match="on none"):
        unit_deployment(bad)


def test_front_replicas_are_placed_by_their_custom_resources():
    from dgserve.cluster.gateway.deployment import gateway_app

    topo = parse_topology({"gateway": {"replicas": 3, "ray_resources": {"dgserve_gateway": 1}},
                           "http": {"replicas": 2, "ray_resources": {"dgserve_http": 1}}})
    ingress = gateway_app(topo)
    gateway = ingress._bound_deployment.init_args[1]  # OpenAIIngress(units, gateway, topology)
    assert ingress._bound_deployment.num_replicas == 2
    assert ingress._bound_deployment.ray_actor_options["resources"] == {"dgserve_http": 1.0}
    assert gateway._bound_deployment.num_replicas == 3
    assert gateway._bound_deployment.ray_actor_options["resources"] == {"dgserve_gateway": 1.0}
    plain = gateway_app(parse_topology({"http": {"enabled": False}}))
    assert plain._bound_deployment.num_replicas == 1 and "resources" not in plain._bound_deployment.ray_actor_options
