"""The client SDK installs and imports alone: grpcio and protobuf, no torch, no ray; its stubs are current."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

from dgserve_client import ApiVersionMismatch, build_request
from dgserve_client.request import check_api
from dgserve_client.v1 import dgserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_the_client_depends_only_on_grpc_and_protobuf():
    deps = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert names == {"grpcio", "grpcio-health-checking", "protobuf"}


def test_the_client_imports_without_torch_or_ray():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['ray'] = None; sys.modules['transformers'] = None;"
            "import dgserve_client, dgserve_client.aio, dgserve_client.cli; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_generated_stubs_match_the_protos():
    r = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_build_request_and_version_check():
    r = build_request(token_ids=[1, 2], seed=4, t_max=0.9, max_new_tokens=None)
    assert list(r.token_ids.ids) == [1, 2] and r.seed == 4 and r.sampler.t_max == 0.9
    assert not r.sampler.HasField("max_new_tokens")
    with pytest.raises(ValueError, match="exactly one"):
        build_request()
    with pytest.raises(ValueError, match="unknown sampler knob"):
        build_request(prompt="x", temperature=1.0)
    check_api(pb.ModelInfo(api_version="1.3"))
    with pytest.raises(ApiVersionMismatch, match="'2.0'; this client speaks 1.x") as e:
        check_api(pb.ModelInfo(api_version="2.0"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
