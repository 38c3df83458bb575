"""The public API over real gRPC, against a real local cluster (gateway + engine unit)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dgserve_client import Client, DeadlineExceeded, InvalidArgument
from dgserve_client.aio import AsyncClient
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

SHORT = {"max_new_tokens": 64, "max_denoising_steps": 6}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_health_is_not_serving_while_loading_then_serving(endpoint):
    _, seen, _ = endpoint
    assert seen[0] == "NOT_SERVING" and seen[-1] == "SERVING"


def test_model_info_tokenize_and_reflection(endpoint, tiny_dir):
    address, _, topo = endpoint
    with Client(address) as c:
        info = c.info()
        assert info.api_version.split(".")[0] == "1" and info.server_version
        assert info.limits.max_prompt_tokens == 512 and info.limits.canvas_length == 32
        assert info.limits.context_length == 32768 and info.vocab_size == 1024
        assert info.topology.profile == "replicated" and info.topology.attention_ranks == 1
        assert info.topology.dtype == info.topology.experts_dtype == "float32"
        assert info.sampler_defaults.max_denoising_steps == 48
        assert {r.name for r in info.sampler_ranges} >= {"max_new_tokens", "t_max", "seed"}
        from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer

        tok = load_tokenizer(tiny_dir)
        assert c.tokenize("Hello there", chat=True) == chat_prompt_ids(tok, "Hello there")
        assert c.tokenize("Hello there") == tok.encode("Hello there", add_special_tokens=False)
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"dgserve.v1.DGServe", "grpc.health.v1.Health"} <= names


@pytest.fixture(scope="module")
def eos_seed(tiny_dir) -> int:
    """A seed whose "Hello there" ends with EOS in block 2, so the output ends in pads (which usage must not count),
    found in-process: which seed does depends on the CPU's float32 kernels (12 on one machine, not on another)."""
    from dgserve.model.generate import generate
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.sampler import SamplerSettings
    from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer

    ck = load_checkpoint(tiny_dir)
    ids = chat_prompt_ids(load_tokenizer(tiny_dir), "Hello there")
    settings = SamplerSettings.from_defaults(ck.generation, **SHORT)
    for seed in range(12, 200):
        r = generate(ck.model, ids, settings, seed=seed)
        if r.finish_reason == "eos" and len(r.steps_per_block) == 2 and ck.generation.pad_token_id in r.token_ids:
            return seed
    raise AssertionError("no seed in 12..199 ends with EOS in block 2")


def test_stream_blocks_equal_unary_equal_dgserve_generate(endpoint, tiny_dir, eos_seed):
    from dgserve.model.config import load_generation_defaults
    from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer

    address, _, _ = endpoint
    seed = eos_seed
    with Client(address) as c:
        unary = c.generate(prompt="Hello there", seed=seed, **SHORT)
        msgs = list(c.generate_stream(prompt="Hello there", seed=seed, stream_drafts=True, **SHORT))
    blocks = [m.block for m in msgs if m.HasField("block")]
    drafts = [m.draft for m in msgs if m.HasField("draft")]
    final = msgs[-1].final
    assert [t for b in blocks for t in b.token_ids] == list(unary.token_ids) == list(final.token_ids)
    assert len(drafts) == sum(final.stats.steps_per_block) and final.stats.blocks == 2
    pad = load_generation_defaults(tiny_dir).pad_token_id
    pads = list(final.token_ids).count(pad)
    assert final.finish_reason == "eos" and 0 < pads < len(final.token_ids) == 64, "pick a seed whose output has pads"
    for r in (unary, final):
        assert r.usage.completion_tokens == len(r.token_ids) - pads
        assert r.usage.prompt_tokens == len(chat_prompt_ids(load_tokenizer(tiny_dir), "Hello there"))
    assert final.text == unary.text
    one = cli(sys.executable, "-m", "dgserve.cluster.cli", "generate", "--model", str(tiny_dir), "--prompt",
              "Hello there", "--seed", str(seed), "--max-new-tokens", "64", "--max-denoising-steps", "6", "--json")
    assert one.returncode == 0, one.stderr
    assert last_json(one.stdout)["token_ids"] == list(unary.token_ids)


def test_client_cli_contract(endpoint, tiny_dir):
    address, _, _ = endpoint
    h = cli(sys.executable, "-m", "dgserve_client.cli", "--target", address, "health")
    assert h.returncode == 0 and h.stdout.strip() == "SERVING"
    got = cli(sys.executable, "-m", "dgserve_client.cli", "--target", address, "generate", "--prompt", "Why?",
              "--seed", "11", "--max-new-tokens", "40", "--json")
    want = cli(sys.executable, "-m", "dgserve.cluster.cli", "generate", "--model", str(tiny_dir), "--prompt", "Why?",
               "--seed", "11", "--max-new-tokens", "40", "--json")
    assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
    assert last_json(got.stdout)["token_ids"] == last_json(want.stdout)["token_ids"]
    info = cli(sys.executable, "-m", "dgserve_client.cli", "--target", address, "info", "--json")
    assert last_json(info.stdout)["api_version"].startswith("1.")


def test_thirty_two_concurrent_streams_complete(endpoint):
    address, _, _ = endpoint

    async def one(c, i):
        n = 0
        async for m in c.generate_stream(token_ids=[5] * (1 + i % 7), seed=i, max_new_tokens=64,
                                         max_denoising_steps=4):
            n += m.HasField("block")
            last = m
        return n, last.final

    async def main():
        async with AsyncClient(address) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    # every stream ends whole: a block message per committed block, 2 unless EOS ended it in the first
    assert len(results) == 32 and all(n == f.stats.blocks == len(f.token_ids) // 32 for n, f in results)
    assert all((n == 2 and f.finish_reason == "length") or f.finish_reason == "eos" for n, f in results)
    assert [f.usage.prompt_tokens for _, f in results] == [1 + i % 7 for i in range(32)]  # per request
    assert len({f.request_id for _, f in results}) == 32


def unit_status(topo) -> dict:
    from ray import serve

    return serve.get_deployment_handle("EngineUnit", topo.name).status.remote().result()["ranks"][0]


def test_a_client_that_cancels_frees_its_request_on_the_server(endpoint):
    address, _, topo = endpoint
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DGServeStub(ch)
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), stream_drafts=True,
                                 sampler=pb.SamplerParams(max_new_tokens=32 * 40, max_denoising_steps=48))
        call = stub.GenerateStream(req, metadata=(("x-request-id", "cancel-me"),))
        first = next(call)
        assert first.request_id == "cancel-me" and first.HasField("draft")
        assert "cancel-me" in unit_status(topo)["request_ids"]
        call.cancel()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15:
        st = unit_status(topo)
        if "cancel-me" not in st["request_ids"] and not st["slots"]:
            break
        time.sleep(0.2)
    assert "cancel-me" not in st["request_ids"] and not st["slots"] and st["request_bytes"] == 0


def test_the_deadline_ends_the_request_on_both_sides(endpoint):
    """End to end: the client gets DEADLINE_EXCEEDED and the unit lets the request go. That the server side ends
    it by its own deadline (not only because the client went away) is checked by the two tests below."""
    address, _, topo = endpoint
    with Client(address, retries=0) as c, pytest.raises(DeadlineExceeded) as e:
        c.generate(token_ids=[5, 6], max_new_tokens=32 * 40, max_denoising_steps=48, timeout=0.5,
                   request_id="late")
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    t0 = time.monotonic()
    while "late" in unit_status(topo)["request_ids"] and time.monotonic() - t0 < 15:
        time.sleep(0.2)
    assert "late" not in unit_status(topo)["request_ids"]


class StandInUnit:
    """A stand-in for the engine units' DeploymentHandle: records what it is sent; each call's response yields the
    events (or raises the exception) that `answer()` returns."""

    def __init__(self, answer):
        self.sent, self.answer = [], answer
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, **_):
        return self

    def _remote(self, request, caller=None):
        self.sent.append(request)
        return StandInResponse(self.answer())


class StandInResponse:  # a streaming DeploymentResponse
    def __init__(self, events):
        self.events = events

    def __aiter__(self):
        return self

    async def __anext__(self):
        if isinstance(self.events, Exception):
            raise self.events
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop()

    def cancel(self):
        pass


def serve_stand_in(tiny_dir, unit: StandInUnit, calls, gw_extra: dict | None = None, **topology):
    """Run the real servicer on a real grpc.aio server in front of `unit`; `calls(stub)` is awaited."""
    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.convert import Limits
    from dgserve.cluster.gateway.server import start_server
    from dgserve.cluster.gateway.service import DGServeService
    from dgserve.model.config import load_generation_defaults

    topo = parse_topology({"gateway": {"port": 0}, **topology})
    gw = SimpleNamespace(topo=topo, unit=unit, tokenizer=None, media=None, limits=Limits(512, 32768, 32, 1024, 4096),
                         defaults=load_generation_defaults(tiny_dir), pad=0, draining=False, inflight=Counter(),
                         caller=None, **(gw_extra or {}))

    async def main():
        gw.hard_stop = asyncio.Event()
        server, _, port = await start_server(DGServeService(gw), topo.gateway, 1 << 20)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await calls(pb_grpc.DGServeStub(ch))
        finally:
            await server.stop(None)

    asyncio.run(main())


def finished_block():
    from dgserve.cluster.engine.events import Finished, Stats

    return [Finished((7,) * 32, "length", Stats(1, (2,), 16.0, 0.0, 0.0, 0.0))]


def test_the_grpc_deadline_becomes_the_engine_requests_timeout(tiny_dir):
    """The servicer gives the unit the call's remaining time as the request's timeout_s, capped to
    serve.max_request_s (which a call without a deadline gets); the unit's rank 0 carries it into the engine
    request."""
    from dgserve.model.config import load_generation_defaults

    unit = StandInUnit(finished_block)

    async def calls(stub):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]))
        assert len((await stub.Generate(req, timeout=5)).token_ids) == 32
        await stub.Generate(req)
        assert [m.WhichOneof("event") async for m in stub.GenerateStream(req, timeout=3)] == ["final"]

    serve_stand_in(tiny_dir, unit, calls, serve={"max_request_s": 4.0})
    sent = unit.sent
    assert [r.prompt_ids for r in sent] == [(5, 6)] * 3
    with_deadline, without, streamed = (r.timeout_s for r in sent)
    assert with_deadline == without == 4.0, (with_deadline, without)  # 5 s and no deadline: max_request_s
    assert 2 < streamed < 3.1  # grpc-timeout rounds up a little
    defaults = load_generation_defaults(tiny_dir)
    assert [r.to_engine(defaults, {}).timeout_s for r in sent] == [with_deadline, without, streamed]  # on rank 0


def test_model_info_reports_the_experts_dtype(tiny_dir):
    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.convert import Limits, model_info
    from dgserve.model.config import load_generation_defaults, load_model_config

    cfg, defaults = load_model_config(tiny_dir), load_generation_defaults(tiny_dir)
    limits = Limits(512, 32768, 32, 1024, 10_000)
    for raw, want in (({}, "float32"), ({"experts_dtype": "fp8"}, "fp8"), ({"dtype": "bfloat16"}, "bfloat16")):
        assert model_info(parse_topology(raw), cfg, defaults, limits, "m", "v").topology.experts_dtype == want


def test_model_info_says_whether_prefix_caching_is_on(tiny_dir):
    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.convert import Limits, model_info
    from dgserve.model.config import load_generation_defaults, load_model_config

    cfg, defaults = load_model_config(tiny_dir), load_generation_defaults(tiny_dir)
    limits = Limits(512, 32768, 32, 1024, 10_000)
    on = model_info(parse_topology({}), cfg, defaults, limits, "m", "v").topology
    off = model_info(parse_topology({"engine": {"prefix_cache": False}}), cfg, defaults, limits, "m", "v").topology
    assert (on.prefix_caching, on.prefix_chunk_tokens) == (True, 512)  # on by default, in prefill chunks
    assert (off.prefix_caching, off.prefix_chunk_tokens) == (False, 0)


def test_each_api_key_is_its_own_tenant_and_the_key_never_reaches_the_unit(tiny_dir, tmp_path):
    """Cached prefixes are shared within a tenant only: the servicer gives the unit a digest of the caller's key."""
    from dgserve.model.config import load_generation_defaults

    (tmp_path / "keys").write_text("key-a\nkey-b\n")
    unit = StandInUnit(finished_block)

    async def calls(stub):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]))
        for key in ("key-a", "key-b", "key-a"):
            await stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),))

    serve_stand_in(tiny_dir, unit, calls, gateway={"port": 0, "api_keys_file": str(tmp_path / "keys"),
                                                   "insecure_remote": False})
    a, b, a2 = (r.tenant for r in unit.sent)
    assert a == a2 and a != b and len(a) == 32 and "key" not in a + b
    assert unit.sent[0].to_engine(load_generation_defaults(tiny_dir), {}).tenant == a  # rank 0 passes it on


def test_model_info_carries_the_serving_units_all_to_all_sweep(tiny_dir):
    from dgserve.cluster.gateway.probe import Verdict

    row = {"bytes": 1 << 20, "count": 1 << 18, "time_us": 500.0, "algbw_gbs": 2.1, "busbw_gbs": 1.4, "wrong": 0}
    info = pb.ModelInfo(api_version="1.0", topology=pb.Topology(profile="packed", expert_ranks=2))
    seen = []

    async def calls(stub):
        seen.append(await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5))

    serve_stand_in(tiny_dir, StandInUnit(finished_block), calls,
                   {"info": info, "last_verdict": Verdict(True, "u1", (row,))})
    [got] = seen
    assert got.topology.profile == "packed" and len(got.topology.all_to_all) == 1
    assert got.topology.all_to_all[0].bytes == 1 << 20 and got.topology.all_to_all[0].busbw_gbs == 1.4
    assert not info.topology.all_to_all  # the gateway's own copy is left as it was


def test_overload_is_refused_at_once_with_a_retry_hint_and_never_fit_is_out_of_range(tiny_dir):
    """Serve's bounded queue (BackPressureError) and a unit's full queue are RESOURCE_EXHAUSTED with the
    grpc-retry-pushback-ms trailer; a request that can never fit is OUT_OF_RANGE, without a hint."""
    from ray.serve.exceptions import BackPressureError

    from dgserve.cluster.engine.errors import Code
    from dgserve.cluster.engine.events import Failed

    answers = [BackPressureError(num_queued_requests=4, max_queued_requests=4),
               [Failed(Code.RESOURCE_EXHAUSTED, "queue full: 8 requests are waiting (max_queued=8); retry later")],
               [Failed(Code.OUT_OF_RANGE, "the request can never fit: ...")]]
    unit = StandInUnit(lambda: answers.pop(0))
    seen = []

    async def calls(stub):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]))
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(req, timeout=5)
            seen.append((e.value.code(), e.value.details(), dict(e.value.trailing_metadata())))

    serve_stand_in(tiny_dir, unit, calls, gateway={"retry_pushback_ms": 750})
    (c1, m1, t1), (c2, m2, t2), (c3, m3, t3) = seen
    assert c1 == c2 == grpc.StatusCode.RESOURCE_EXHAUSTED and c3 == grpc.StatusCode.OUT_OF_RANGE
    assert "overloaded: every engine unit is busy" in m1 and "max_queued_requests=4" in m1
    assert "queue full" in m2 and "can never fit" in m3
    assert t1["grpc-retry-pushback-ms"] == t2["grpc-retry-pushback-ms"] == "750"
    assert "grpc-retry-pushback-ms" not in t3 and all("x-request-id" in t for t in (t1, t2, t3))


def test_a_unit_request_past_its_timeout_fails_with_deadline_exceeded(endpoint):
    from ray import serve

    from dgserve.cluster.engine.errors import Code
    from dgserve.cluster.engine.events import Failed, Finished
    from dgserve.cluster.messages import GenerateRequest

    _, _, topo = endpoint
    handle = serve.get_deployment_handle("EngineUnit", topo.name)
    req = GenerateRequest((5, 6), sampler={"max_new_tokens": 32 * 40, "max_denoising_steps": 48}, timeout_s=0.3,
                          request_id="unit-late")
    t0 = time.monotonic()
    events = list(handle.options(stream=True).generate.remote(req))
    took = time.monotonic() - t0
    assert isinstance(events[-1], Failed) and events[-1].code is Code.DEADLINE_EXCEEDED, events[-1]
    assert "unit-late" in events[-1].message and not any(isinstance(e, Finished) for e in events)
    assert took < 10  # 40 blocks of 48 steps would take far longer
    st = unit_status(topo)
    assert "unit-late" not in st["request_ids"] and st["errors"].get("DEADLINE_EXCEEDED", 0) >= 1


def test_the_request_id_comes_back_in_responses_and_errors(endpoint):
    address, _, _ = endpoint
    with Client(address) as c:
        r = c.generate(token_ids=[5, 6], request_id="abc-123", max_new_tokens=32, max_denoising_steps=2)
        assert r.request_id == "abc-123"
        with pytest.raises(InvalidArgument) as e:
            c.generate(token_ids=[], request_id="bad-456")
        assert e.value.request_id == "bad-456" and "bad-456" in e.value.message
        made = c.generate(token_ids=[5], max_new_tokens=32, max_denoising_steps=2)
        assert len(made.request_id) >= 16  # made by the client when absent


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "prompt"),
    ({"text": ""}, "prompt"),
    ({"token_ids": pb.TokenIds(ids=[])}, "token_ids"),
    ({"token_ids": pb.TokenIds(ids=[5, 5000])}, "token_ids"),
    ({"token_ids": pb.TokenIds(ids=[5] * 600)}, "max_prompt_tokens"),
    ({"sampler": pb.SamplerParams(max_new_tokens=0)}, "sampler.max_new_tokens"),
    ({"sampler": pb.SamplerParams(max_new_tokens=40000)}, "context"),
    ({"sampler": pb.SamplerParams(max_denoising_steps=5000)}, "sampler.max_denoising_steps"),
    ({"sampler": pb.SamplerParams(t_min=0.9, t_max=0.5)}, "sampler.t_max"),
    ({"sampler": pb.SamplerParams(entropy_bound=0)}, "sampler.entropy_bound"),
    ({"sampler": pb.SamplerParams(confidence_threshold=-1)}, "sampler.confidence_threshold"),
    ({"seed": 2**63}, "seed"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(endpoint, kwargs, field):
    address, _, _ = endpoint
    base = {"token_ids": pb.TokenIds(ids=[5, 6])} if "text" not in kwargs and "token_ids" not in kwargs and \
        kwargs != {} else {}
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DGServeStub(ch)
        for method in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as e:
                method(pb.GenerateRequest(**{**base, **kwargs}), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert field in e.value.details()
    with Client(address) as c:  # the server keeps serving
        assert c.health() == "SERVING"
        assert len(c.generate(token_ids=[5], max_new_tokens=32, max_denoising_steps=2).token_ids) == 32
