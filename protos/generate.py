"""Generate the Python stubs of protos/dgserve/v1/*.proto into the client package (dgserve_client.v1).

    python protos/generate.py            # rewrite client/dgserve_client/v1/*_pb2*.py
    python protos/generate.py --check    # exit 1 if the committed stubs differ from freshly generated ones

The .proto files are copied under a `dgserve_client/v1/` include root so the generated modules import each other
as `dgserve_client.v1.*` (the wire names stay `dgserve.v1.*`). Needs grpcio-tools (a dev dependency).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "protos" / "dgserve" / "v1"
DEST = ROOT / "client" / "dgserve_client" / "v1"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        inc = Path(tmp) / "include"
        pkg = inc / "dgserve_client" / "v1"
        pkg.mkdir(parents=True)
        protos = []
        for p in sorted(SRC.glob("*.proto")):
            shutil.copy(p, pkg / p.name)
            protos.append(f"dgserve_client/v1/{p.name}")
        gen = Path(tmp) / "gen"
        gen.mkdir()
        rc = protoc.main(["protoc", f"-I{inc}", f"--python_out={gen}", f"--pyi_out={gen}",
                          f"--grpc_python_out={gen}", *protos])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc})")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((gen / "dgserve_client" / "v1").iterdir()):
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
        return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if not args.check:
        for f in generate(DEST):
            print(f"wrote {f.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [f.name for f in fresh if not (DEST / f.name).is_file() or
                 (DEST / f.name).read_bytes() != f.read_bytes()]
    if stale:
        print(f"stale generated stubs: {stale}; run python protos/generate.py", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
