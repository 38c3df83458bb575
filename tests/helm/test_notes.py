"""NOTES.txt, as `helm install --dry-run=client` prints it: how to reach the endpoint for the release's values,
and where the units' all-to-all self-test is."""

from __future__ import annotations

from .chart import CHART, helm


def notes(*sets: str) -> str:
    args = ["install", "dg", str(CHART), "-n", "serving", "--dry-run=client"]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    return out[out.index("NOTES:"):]


def test_notes_say_how_to_reach_the_endpoint_and_where_the_self_test_is():
    text = notes()
    assert "kubectl port-forward -n serving svc/dg-dgserve-grpc 50051:50051" in text
    assert "dgserve-client --target 127.0.0.1:50051 health" in text
    assert "curl http://127.0.0.1:8000/v1/models" in text
    assert "ray_dgserve_all_to_all_busbw_gbs" in text and "all-to-all self-test" in text
    assert "WARNING: no tls.existingSecret" in text and "helm test" not in text


def test_notes_follow_tls_keys_and_the_fabric_check():
    text = notes("tls.existingSecret=t", "http.tls=true", "apiKeys.existingSecret=k", "http.routePrefix=/openai",
                 "fabricCheck.enabled=true")
    assert "--tls-ca ca.crt --tls-server-name dg-dgserve-grpc.serving.svc --api-key-file KEY_FILE health" in text
    assert "https://127.0.0.1:8000/openai/v1/models" in text and "helm test dg -n serving --timeout 11m" in text
    assert "kubectl logs -n serving job/dg-dgserve-fabric-check" in text
    assert "WARNING" not in text


def test_notes_say_the_http_api_is_plaintext_without_http_tls():
    text = notes("tls.existingSecret=t")
    assert "curl http://127.0.0.1:8000/v1/models" in text and "NOTE: the HTTP API is plaintext" in text
