"""How a client proves who it is and protects the channel: an API key sent as `authorization: Bearer <key>`, and
TLS (server verification, optionally a client certificate for mTLS)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

API_KEY_ENV = "DGSERVE_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


@dataclass(frozen=True)
class TLS:
    """TLS settings of a channel. `ca_file`: PEM roots that sign the server's certificate (None: the system's);
    `cert_file` and `key_file`: this client's certificate and key (mTLS); `server_name`: the name to check in the
    server's certificate when it differs from the target's host."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS: give cert_file and key_file together (a client certificate and its key)")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"TLS: cannot read the {what} {path!r} ({e.strerror})") from None

        return grpc.ssl_channel_credentials(read(self.ca_file, "CA file"), read(self.key_file, "key file"),
                                            read(self.cert_file, "certificate file"))

    def options(self) -> tuple:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()


def api_key_metadata(api_key: str | None, target: str, secure: bool, insecure: bool) -> tuple[tuple[str, str], ...]:
    """The authorization header for `api_key` (default: the DGSERVE_API_KEY environment variable). A key is never
    sent in plaintext to another machine unless `insecure` says so (e.g. a mesh sidecar encrypts the hop)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if not key:
        return ()
    if not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError("api_key: must be printable, without spaces")
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    if not secure and not insecure and host not in LOOPBACK:
        raise ValueError(f"api_key: refusing to send an API key in plaintext to {target}; use TLS (tls=TLS(...)) "
                         "or pass insecure=True if something else encrypts the connection")
    return (("authorization", f"Bearer {key}"),)
