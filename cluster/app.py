"""The Serve application builder a RayService names in its serveConfigV2 (the Helm chart renders it):

    applications:
      - name: dgserve
        import_path: dgserve.cluster.app:build
        route_prefix: /              # the topology's http.route_prefix (null with http.enabled false)
        args: {topology: {...}}      # the project's own topology config (cluster/config.py)

Serve calls `build` with `args` checked against `AppArgs` (unknown keys refused); the topology is then checked by
the project's own loader, which names any bad field, and becomes the same application `dgserve serve` deploys.
No `from __future__ import annotations` here: Serve reads the builder's parameter annotation as a class.
"""

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from .config import parse_topology
from .gateway.deployment import gateway_app

IMPORT_PATH = "dgserve.cluster.app:build"


class AppArgs(BaseModel):
    """serveConfigV2 `applications[].args` of a dgserve application."""

    model_config = ConfigDict(extra="forbid")

    topology: dict = {}  # cluster/config.py's topology (the embedded tiny model when empty)


def build(args: AppArgs) -> Application:
    return gateway_app(parse_topology(args.topology))


def serve_application(topology: dict, name: str = "dgserve") -> dict:
    """The serveConfigV2 application entry for a topology (what the chart renders)."""
    topo = parse_topology(topology)
    app = {"name": name, "import_path": IMPORT_PATH, "args": {"topology": topology}}
    app["route_prefix"] = topo.http.route_prefix if topo.http.enabled else None  # None: no HTTP route
    return app
