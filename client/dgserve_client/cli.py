"""`dgserve-client generate|health|info`: the last line of `--json` output is one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from .client import Client
from .errors import DGServeClientError
from .request import KNOBS
from .security import TLS


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--token-ids: expected comma-separated integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dgserve-client", description="Talk to a dgserve gRPC endpoint.")
    ap.add_argument("--target", default="127.0.0.1:50051", help="host:port (default 127.0.0.1:50051)")
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline per call, seconds")
    sec = ap.add_argument_group("security (an API key is also read from $DGSERVE_API_KEY)")
    sec.add_argument("--api-key-file", type=Path, help="a file holding the API key (sent as a Bearer token)")
    sec.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    sec.add_argument("--tls-ca", help="PEM roots that signed the server's certificate (implies --tls)")
    sec.add_argument("--tls-cert", help="this client's certificate, PEM (mTLS; with --tls-key)")
    sec.add_argument("--tls-key", help="this client's private key, PEM")
    sec.add_argument("--tls-server-name", help="the name to check in the server's certificate")
    sec.add_argument("--insecure", action="store_true",
                     help="allow sending the API key in plaintext to another machine")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate; with --stream, print blocks as they are committed")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message (the chat template is applied on the server)")
    src.add_argument("--token-ids", type=_ids, help="raw token ids, e.g. 2,651,1234")
    g.add_argument("--seed", type=int)
    g.add_argument("--thinking", action="store_true")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--request-id")
    g.add_argument("--json", action="store_true")
    for k in KNOBS:
        g.add_argument(f"--{k.replace('_', '-')}", type=int if k in ("max_new_tokens", "max_denoising_steps",
                                                                    "stability_threshold") else float)
    h = sub.add_parser("health", help="grpc.health.v1 status")
    h.add_argument("--json", action="store_true")
    i = sub.add_parser("info", help="model, versions, topology, limits, sampler defaults and ranges")
    i.add_argument("--json", action="store_true")
    return ap


def _as_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _security(args) -> dict:
    key = None
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {str(args.api_key_file)!r} ({e.strerror})") from None
    use_tls = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    tls = TLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if use_tls else None
    return {"api_key": key, "tls": tls, "insecure": args.insecure}


def run(args) -> int:
    with Client(args.target, timeout=args.timeout, **_security(args)) as c:
        if args.command == "health":
            status = c.health()
            print(json.dumps({"status": status}) if args.json else status)
            return 0 if status == "SERVING" else 1
        if args.command == "info":
            info = _as_dict(c.info())
            print(json.dumps(info) if args.json else json.dumps(info, indent=2))
            return 0
        knobs = {k: getattr(args, k) for k in KNOBS}
        kw = {"prompt": args.prompt, "token_ids": args.token_ids, "seed": args.seed, "thinking": args.thinking,
              "request_id": args.request_id, **knobs}
        if args.stream:
            final = None
            for msg in c.generate_stream(**kw):
                if msg.HasField("block") and not args.json:
                    print(msg.block.text, end="", flush=True)
                if msg.HasField("final"):
                    final = msg.final
            result = final
            if not args.json:
                print()
        else:
            result = c.generate(**kw)
        out = _as_dict(result)
        out["token_ids"] = list(result.token_ids)
        if args.json:
            print(json.dumps(out))
        elif not args.stream:
            print(result.text)
        print(f"[request {result.request_id}: {len(result.token_ids)} tokens, steps per block "
              f"{list(result.stats.steps_per_block)}, {result.stats.total_s:.2f}s]", file=sys.stderr)
        return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DGServeClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.code.name == "INVALID_ARGUMENT" else 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
