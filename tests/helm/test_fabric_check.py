"""The fabric check's script (the `helm test` hook), run here by sh against a stand-in kubectl: it execs
alltoall_perf in each running GPU pod of the release, reads nccl-tests' "Avg bus bandwidth" line, and fails when a
pod is under the threshold, prints nothing parseable, or no GPU pod runs."""

from __future__ import annotations

import subprocess

import pytest

from .chart import find, render

NCCL_OUT = """#  nThread 1 nGpus 8 minBytes 8388608 maxBytes 1073741824 step: 2(factor) warmup iters: 5 iters: 20
#       size         count      type   redop    root     time   algbw   busbw #wrong
     8388608        262144     float    none      -1    100.1   83.80   73.33      0
  1073741824      33554432     float    none      -1   4900.2  219.12  191.73      0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : {bw}
"""


def script(**values) -> str:
    job = find(render({"fabricCheck": {"enabled": True, **values}}), "Job")
    return job["spec"]["template"]["spec"]["containers"][0]["args"][0]


def run(tmp_path, text: str, pods: str, bandwidths: dict[str, str]) -> subprocess.CompletedProcess:
    """sh runs the hook's script with a kubectl that lists `pods` and answers each exec with its bandwidth."""
    calls = tmp_path / "calls"
    (tmp_path / "kubectl").write_text("#!/bin/sh\n"
                                      f'echo "$@" >> {calls}\n'
                                      'if [ "$1" = get ]; then printf "%s" "$PODS"; exit 0; fi\n'
                                      'pod=$4\n'
                                      'case "$pod" in\n' + "".join(
                                          f'  {p}) cat <<"EOF"\n{NCCL_OUT.format(bw=b) if b else "NCCL failure"}\nEOF\n'
                                          f'  ;;\n' for p, b in bandwidths.items()) + "esac\n")
    (tmp_path / "kubectl").chmod(0o755)
    return subprocess.run(["sh", "-c", text], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "PODS": pods})


@pytest.mark.parametrize(("bandwidths", "ok"), [
    ({"pod-a": "191.73", "pod-b": "150.2"}, True),
    ({"pod-a": "191.73", "pod-b": "99.9"}, False),  # one pod under 100 GB/s fails the check
    ({"pod-a": "191.73", "pod-b": ""}, False),  # no bandwidth line: alltoall_perf failed
])
def test_the_hook_fails_under_the_threshold(tmp_path, bandwidths, ok):
    out = run(tmp_path, script(minBusbwGBps=100), " ".join(bandwidths), bandwidths)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    assert "pod-a (engine, 8 GPUs): alltoall avg busbw 191.73 GB/s, threshold 100" in out.stdout
    calls = (tmp_path / "calls").read_text()
    assert "exec -n serving pod-b -c ray-worker -- /opt/nccl-tests/build/alltoall_perf -b 8M -e 1G -f 2 -g 8" in calls
    assert "-l app.kubernetes.io/instance=rel,dgserve.io/role=engine" in calls


def test_no_running_gpu_pod_is_a_failure(tmp_path):
    out = run(tmp_path, script(), "", {})
    assert out.returncode == 1 and "no running GPU worker pod of release rel" in out.stdout
