"""Render helm/dgserve with the real helm binary and check what comes out (Airflow's helm-tests pattern: render,
load every object, validate, assert on dicts).

Validation offline: built-in kinds with `kubernetes-validate --strict`; the RayService and the Prometheus
operator's monitors against their CRD schemas in ../shared/k8s/crds, made strict the way kubeconform's -strict
does (additionalProperties false wherever an object lists its properties and does not preserve unknown fields).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import yaml

from .helm_binary import helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dgserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The CRD schemas: $DGSERVE_CRDS, else ../shared/k8s/crds beside the checkout, else the workplace's copy.
CRD_PLACES = [Path(p) for p in (os.environ.get("DGSERVE_CRDS"),) if p] + [
    ROOT.parent / "shared" / "k8s" / "crds", Path("/work/shared/k8s/crds")]
CRDS = next((p for p in CRD_PLACES if p.is_dir()), CRD_PLACES[0])
RELEASE, NAMESPACE = "rel", "serving"
KUBE_VERSION = "1.31.0"


class HelmError(Exception):
    pass


def helm(*args: str) -> str:
    out = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise HelmError(out.stderr.strip() or out.stdout.strip())
    return out.stdout


def render(values: dict | None = None, files: tuple[Path, ...] = (), show_only: str | None = None,
           set_values: tuple[str, ...] = ()) -> list[dict]:
    """`helm template` of the chart (with values files, then `values` as one more file); the objects, in order."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values or {}, f)
        f.flush()
        args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION]
        for file in (*files, Path(f.name)):
            args += ["-f", str(file)]
        for s in set_values:
            args += ["--set", s]
        if show_only:
            args += ["--show-only", show_only]
        return [d for d in yaml.safe_load_all(helm(*args)) if d]


def lint(files: tuple[Path, ...] = ()) -> str:
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    for file in files:
        args += ["-f", str(file)]
    return helm(*args)


def find(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"{len(matches)} {kind} named *{name_suffix}: {[o['metadata']['name'] for o in objects]}"
    return matches[0]


def serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(find(objects, "RayService")["spec"]["serveConfigV2"])


def topology(objects: list[dict]) -> dict:
    return serve_config(objects)["applications"][0]["args"]["topology"]


def group(objects: list[dict], name: str) -> dict:
    spec = find(objects, "RayService")["spec"]["rayClusterConfig"]
    (g,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == name]
    return g


def container(pod_group: dict) -> dict:
    return pod_group["template"]["spec"]["containers"][0]


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# --- strict CRD schemas ---------------------------------------------------------------------------------------

def strict(schema):
    """kubeconform's -strict: unknown fields are errors wherever an object lists its properties."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crd_schema(kind: str) -> dict | None:
    """The strict schema of a CRD kind from ../shared/k8s/crds (None when the folder is not there)."""
    files = {"RayService": "ray.io_rayservices.yaml", "PodMonitor": "monitoring.coreos.com_podmonitor_v1.json",
             "ServiceMonitor": "monitoring.coreos.com_servicemonitor_v1.json"}
    path = CRDS / files[kind]
    if not path.exists():
        return None
    if path.suffix == ".json":
        return strict(json.loads(path.read_text()))
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])
