"""The gateway's guards on a real grpc.aio server (the gateway's own `start_server`, with a scripted DGServe
service in place of the engine): API keys, TLS and mTLS, and the settings that keep a plaintext server on
loopback. The SDK and its CLI are the clients."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dgserve.cluster.config import parse_topology
from dgserve.cluster.gateway import security
from dgserve.cluster.gateway.server import start_server
from dgserve.model.errors import ConfigError
from dgserve_client import TLS, Client, Unauthenticated, Unavailable
from dgserve_client.cli import main as client_cli
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc
from tests.certs import make_certs


class Scripted(pb_grpc.DGServeServicer):
    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(api_version="1.0", model_id="scripted")

    async def Generate(self, request, context):
        return pb.GenerateResponse(request_id="r", token_ids=[1, 2, 3])

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(request_id="r", final=pb.GenerateResponse(token_ids=[1, 2, 3]))

    async def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_ids=[4, 5])


@contextlib.contextmanager
def server(**gateway):
    """The gateway's gRPC server on a free loopback port, run by an event loop in a thread; yields the address."""
    settings = parse_topology({"gateway": {"port": 0, **gateway}, "http": {"enabled": False}}).gateway
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv, _, port = asyncio.run_coroutine_threadsafe(start_server(Scripted(), settings, 1 << 20), loop).result(30)
    try:
        yield f"127.0.0.1:{port}" if not settings.tls else f"localhost:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def keys_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# one key per line\nkey-one\nkey-two, key-three\n")
    return f


def every_method(client: Client) -> dict[str, object]:
    """Each DGServe method through the SDK, and reflection; values are results or the error raised."""
    out: dict[str, object] = {}
    calls = {"GetModelInfo": client.info, "Generate": lambda: client.generate(token_ids=[5]),
             "GenerateStream": lambda: list(client.generate_stream(token_ids=[5])),
             "Tokenize": lambda: client.tokenize("hi")}
    for name, call in calls.items():
        try:
            out[name] = call()
        except Exception as e:
            out[name] = e
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    try:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                       metadata=client.extra_metadata, timeout=5))
        out["reflection"] = "ok"
    except grpc.RpcError as e:
        out["reflection"] = e.code()
    return out


def test_without_a_valid_key_every_method_but_health_is_unauthenticated(keys_file):
    with server(api_keys_file=str(keys_file)) as address:
        with Client(address, retries=0, api_key="") as anonymous:
            assert anonymous.health() == "NOT_SERVING"  # health needs no key
            got = every_method(anonymous)
        assert all(isinstance(v, Unauthenticated) and "no API key" in v.message
                   for k, v in got.items() if k != "reflection"), got
        assert got["reflection"] == grpc.StatusCode.UNAUTHENTICATED
        with Client(address, retries=0, api_key="key-zero") as wrong:
            got = every_method(wrong)
        assert all(isinstance(v, Unauthenticated) and "not valid" in v.message
                   for k, v in got.items() if k != "reflection"), got
        for key in ("key-one", "key-three"):
            with Client(address, retries=0, api_key=key) as good:
                got = every_method(good)
            assert got["Generate"].token_ids == [1, 2, 3] and got["Tokenize"] == [4, 5], got
            assert got["reflection"] == "ok" and got["GetModelInfo"].model_id == "scripted"


def test_keys_from_an_environment_variable_and_the_sdks_default(monkeypatch):
    monkeypatch.setenv("DGSERVE_TEST_KEYS", "alpha\nbeta")
    with server(api_keys_env="DGSERVE_TEST_KEYS") as address:
        monkeypatch.setenv("DGSERVE_API_KEY", "beta")  # the SDK's default key
        with Client(address, retries=0) as c:
            assert c.generate(token_ids=[5]).token_ids == [1, 2, 3]
        monkeypatch.setenv("DGSERVE_API_KEY", "gamma")
        with Client(address, retries=0) as c, pytest.raises(Unauthenticated):
            c.generate(token_ids=[5])


def test_a_changed_key_file_takes_effect_without_a_restart(keys_file, monkeypatch):
    """A mounted Kubernetes Secret is updated in place: the new keys work, the removed ones stop working."""
    monkeypatch.setattr(security, "RELOAD_EVERY_S", 0.0)
    with server(api_keys_file=str(keys_file)) as address:
        with Client(address, retries=0, api_key="key-one") as c:
            assert c.tokenize("x") == [4, 5]
        keys_file.write_text("rotated-key\n")
        import os

        st = keys_file.stat()
        os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new mtime, whatever the clock
        with Client(address, retries=0, api_key="key-one") as c, pytest.raises(Unauthenticated):
            c.tokenize("x")
        with Client(address, retries=0, api_key="rotated-key") as c:
            assert c.tokenize("x") == [4, 5]
        keys_file.write_text("")  # emptied by mistake: the last good keys stay
        os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        with Client(address, retries=0, api_key="rotated-key") as c:
            assert c.tokenize("x") == [4, 5]


@pytest.mark.parametrize(("gateway", "field"), [
    ({"api_keys_file": "/no/such/keys"}, "gateway.api_keys_file"),
    ({"api_keys_env": "DGSERVE_NO_SUCH_VARIABLE"}, "gateway.api_keys_env"),
    ({"tls_cert_file": "/no/such.crt", "tls_key_file": "/no/such.key"}, "gateway.tls_cert_file"),
])
def test_unreadable_keys_or_certificates_fail_at_start_naming_the_field(gateway, field):
    with pytest.raises(ConfigError) as e, server(**gateway):
        pass
    assert e.value.field == field


def test_an_empty_key_file_is_refused_at_start(tmp_path):
    (tmp_path / "keys").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="at least one key"), server(api_keys_file=str(tmp_path / "keys")):
        pass


@pytest.mark.parametrize(("gateway", "field"), [
    ({"host": "0.0.0.0"}, "gateway.host"),
    ({"host": "10.1.2.3"}, "gateway.host"),
    ({"tls_key_file": "k.pem"}, "gateway.tls_key_file"),
    ({"tls_client_ca_file": "ca.pem"}, "gateway.tls_client_ca_file"),
    ({"insecure_remote": "yes"}, "gateway.insecure_remote"),
    ({"api_keys_env": "NOT A NAME"}, "gateway.api_keys_env"),
    ({"max_text_bytes": 0}, "gateway.max_text_bytes"),
])
def test_gateway_settings_that_would_open_or_break_the_server_are_refused(gateway, field):
    with pytest.raises(ConfigError) as e:
        parse_topology({"gateway": gateway})
    assert e.value.field == field


@pytest.mark.parametrize(("raw", "field", "words"), [
    ({"http": {"host": "0.0.0.0"}}, "http.host", "without TLS"),
    ({"gateway": {"tls_cert_file": "c", "tls_key_file": "k", "tls_client_ca_file": "ca"}},
     "gateway.tls_client_ca_file", "cannot require client certificates"),
    ({"http": {"route_prefix": "openai"}}, "http.route_prefix", "starts with '/'"),
    ({"http": {"port": 0}}, "http.port", "1..65535"),
])
def test_http_settings_that_would_open_the_api_or_promise_what_it_cannot_do_are_refused(raw, field, words):
    with pytest.raises(ConfigError, match=words) as e:
        parse_topology(raw)
    assert e.value.field == field


def test_a_non_loopback_host_is_accepted_with_tls_or_an_explicit_plaintext_opt_in():
    assert parse_topology({"gateway": {"host": "0.0.0.0", "tls_cert_file": "c", "tls_key_file": "k"}}).gateway.tls
    assert parse_topology({"gateway": {"host": "0.0.0.0", "insecure_remote": True}}).gateway.insecure_remote


def test_tls_the_client_verifies_the_server_and_plaintext_is_refused(certs):
    with server(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key) as address:
        with Client(address, retries=0, tls=TLS(ca_file=certs.ca)) as c:
            assert c.generate(token_ids=[5]).token_ids == [1, 2, 3]
        with Client(address, retries=0, tls=TLS(ca_file=certs.other_ca)) as c, pytest.raises(Unavailable):
            c.generate(token_ids=[5], timeout=5)  # a server this client cannot verify
        with Client(address, retries=0) as plain, pytest.raises(Unavailable):
            plain.generate(token_ids=[5], timeout=5)


def test_mtls_a_client_needs_a_certificate_signed_by_the_client_ca(certs):
    with server(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key,
                tls_client_ca_file=certs.ca) as address:
        with Client(address, retries=0, tls=TLS(ca_file=certs.ca)) as c, pytest.raises(Unavailable):
            c.generate(token_ids=[5], timeout=5)
        with Client(address, retries=0, tls=TLS(certs.ca, certs.client_cert, certs.client_key)) as c:
            assert c.generate(token_ids=[5]).token_ids == [1, 2, 3]


def test_keys_and_tls_together_through_the_client_cli(certs, keys_file, capsys):
    with server(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key,
                api_keys_file=str(keys_file)) as address:
        key = keys_file.parent / "my-key"
        key.write_text("key-two\n")
        base = ["--target", address, "--tls-ca", certs.ca]
        assert client_cli([*base, "--api-key-file", str(key), "generate", "--token-ids", "5", "--json"]) == 0
        assert '"token_ids": [1, 2, 3]' in capsys.readouterr().out
        key.write_text("wrong\n")
        assert client_cli([*base, "--api-key-file", str(key), "generate", "--token-ids", "5"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert client_cli([*base, "health"]) == 1  # answered without a key: NOT_SERVING (no engine here)
        assert "NOT_SERVING" in capsys.readouterr().out


def test_the_sdk_never_sends_a_key_in_plaintext_to_another_machine():
    with pytest.raises(ValueError, match="plaintext"):
        Client("10.1.2.3:50051", api_key="secret")
    Client("10.1.2.3:50051", api_key="secret", insecure=True).close()  # a sidecar encrypts the hop
    Client("127.0.0.1:50051", api_key="secret").close()
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TLS(cert_file="c.pem")
