"""The Serve replicas that only relay (the gateway, an engine unit's replica) never import torch: it costs ~1.4 s of
every replica start, which is most of what a unit rebuild or a gateway restart waits for besides the ranks."""

from __future__ import annotations

import subprocess
import sys


def test_the_relaying_replicas_do_not_import_torch():
    code = ("import sys, dgserve.cluster.units, dgserve.cluster.gateway.deployment; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout[:500]
