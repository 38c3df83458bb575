"""The fabric check's script (the `helm test` hook), run here by sh against a stand-in kubectl: it execs
alltoall_perf in each running GPU pod of the release, reads nccl-tests' "Avg bus bandwidth" line, and fails when a
pod is under the threshold, prints nothing parseable, or no GPU pod runs. Across pods it runs `dgserve
fabric-check` in two pods at once: the stand-in runs the real command here, over gloo on loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgserve.cluster.api import free_port

from .chart import find, render

NCCL_OUT = """#  nThread 1 nGpus 8 minBytes 8388608 maxBytes 1073741824 step: 2(factor) warmup iters: 5 iters: 20
#       size         count      type   redop    root     time   algbw   busbw #wrong
     8388608        262144     float    none      -1    100.1   83.80   73.33      0
  1073741824      33554432     float    none      -1   4900.2  219.12  191.73      0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : {bw}
"""
DGSERVE = shutil.which("dgserve", path=str(Path(sys.executable).parent))
# What the stand-in adds to `dgserve fabric-check` (later flags win): gloo, one rank a pod, small sizes.
ON_CPU = "--backend gloo --gpus 1 --min-bytes 64K --max-bytes 256K --iters 2 --warmup 1"


def script(**values) -> str:
    job = find(render({"fabricCheck": {"enabled": True, **values}}), "Job")
    return job["spec"]["template"]["spec"]["containers"][0]["args"][0]


def run(tmp_path, text: str, bandwidths: dict[str, str]) -> subprocess.CompletedProcess:
    """sh runs the hook's script with a kubectl that lists the pods of `bandwidths` (all at 127.0.0.1), answers an
    alltoall_perf exec with the pod's bandwidth and runs a `dgserve fabric-check` exec here."""
    calls = tmp_path / "calls"
    answers = "".join(f'  {p}) cat <<"EOF"\n{NCCL_OUT.format(bw=b) if b else "NCCL failure"}\nEOF\n  ;;\n'
                      for p, b in bandwidths.items())
    (tmp_path / "kubectl").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ "$1" = get ]; then\n'
        '  case "$*" in *podIP*) for p in $PODS; do printf "%s=127.0.0.1 " "$p"; done;; *) printf "%s" "$PODS";; '
        'esac\n  exit 0\nfi\n'
        'pod=$4\nshift 7\n'
        f'if [ "$1" = dgserve ]; then shift; exec {DGSERVE} "$@" {ON_CPU}; fi\n'
        f'case "$pod" in\n{answers}esac\n')
    (tmp_path / "kubectl").chmod(0o755)
    return subprocess.run(["sh", "-c", text], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "PODS": " ".join(bandwidths),
                               "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize(("bandwidths", "ok"), [
    ({"pod-a": "191.73", "pod-b": "150.2"}, True),
    ({"pod-a": "191.73", "pod-b": "99.9"}, False),  # one pod under 100 GB/s fails the check
    ({"pod-a": "191.73", "pod-b": ""}, False),  # no bandwidth line: alltoall_perf failed
])
def test_the_hook_fails_under_the_threshold(tmp_path, bandwidths, ok):
    out = run(tmp_path, script(minBusbwGBps=100, crossPod={"enabled": False}), bandwidths)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    assert "pod-a (engine, 8 GPUs): alltoall avg busbw 191.73 GB/s, threshold 100" in out.stdout
    calls = (tmp_path / "calls").read_text()
    assert "exec -n serving pod-b -c ray-worker -- /opt/nccl-tests/build/alltoall_perf -b 8M -e 512M -f 2 -g 8" in calls
    assert "-l app.kubernetes.io/instance=rel,dgserve.io/role=engine" in calls


def test_no_running_gpu_pod_is_a_failure(tmp_path):
    out = run(tmp_path, script(), {})
    assert out.returncode == 1 and "no running GPU worker pod of release rel" in out.stdout


@pytest.mark.parametrize(("threshold", "ok"), [(0.001, True), (1e6, False)])
def test_across_pods_dgserve_fabric_check_runs_in_two_pods_at_once(tmp_path, threshold, ok):
    text = script(crossPod={"enabled": True, "port": free_port(), "minBusbwGBps": threshold})
    out = run(tmp_path, text, {"pod-a": "191.73", "pod-b": "180.0", "pod-c": "170.0"})
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    assert "across 2 pods (engine, 8 GPUs each): alltoall avg busbw " in out.stdout
    if not ok:  # the reports are shown when the check fails
        assert "# Avg bus bandwidth" in out.stdout and "dgserve fabric-check: 2 pod(s) x 1 rank(s), gloo" in out.stdout
    calls = (tmp_path / "calls").read_text()
    assert "--node-rank 0 --nodes 2 --master 127.0.0.1:" in calls and "--node-rank 1 --nodes 2" in calls
    assert "pod-c -c ray-worker -- dgserve" not in calls  # crossPod.pods: 2


def test_across_pods_is_skipped_with_one_pod(tmp_path):
    out = run(tmp_path, script(), {"pod-a": "191.73"})
    assert out.returncode == 0 and "across pods (engine): 1 running pod(s), skipped (it needs 2)" in out.stdout
