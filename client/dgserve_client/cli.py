"""`dgserve-client generate|chat|health|info`: the last line of `--json` output is one JSON object."""

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
    g.add_argument("--thinking", action="store_true")
    ch = sub.add_parser("chat", help="one chat turn; with --stream, print the reply as blocks are committed")
    ch.add_argument("message", help="the user message")
    ch.add_argument("--system", help="a system prompt")
    ch.add_argument("--tools", type=Path, help="a JSON file: a list of tool declarations (OpenAI's shape)")
    ch.add_argument("--thinking", action="store_true", help="thinking mode: the reasoning comes apart")
    ch.add_argument("--image", action="append", type=Path, default=[],
                    help="a PNG, JPEG or WebP file sent with the message (repeatable)")
    ch.add_argument("--video", action="append", type=Path, default=[],
                    help="a video file sent with the message, sampled on the server at --video-fps (repeatable)")
    ch.add_argument("--visual-budget", type=int, default=0,
                    help="soft tokens an image: 70 | 140 | 280 | 560 | 1120 (default: the server's, 280)")
    ch.add_argument("--frame-budget", type=int, default=0,
                    help="soft tokens a video frame, of the same five (default: the server's, 70)")
    ch.add_argument("--video-fps", type=float, default=0.0, help="frames a second of video (default: one)")
    for p in (g, ch):
        _call_args(p)
    h = sub.add_parser("health", help="grpc.health.v1 status")
    h.add_argument("--json", action="store_true")
    i = sub.add_parser("info", help="model, versions, topology, limits, sampler defaults and ranges")
    i.add_argument("--json", action="store_true")
    return ap


def _call_args(p: argparse.ArgumentParser) -> None:
    """Seed, streaming, request id, JSON output and the sampler knobs of a generate or chat call."""
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--request-id")
    p.add_argument("--json", action="store_true")
    for k in KNOBS:
        p.add_argument(f"--{k.replace('_', '-')}", type=int if k in ("max_new_tokens", "max_denoising_steps",
                                                                    "stability_threshold") else float)


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
        if args.command == "chat":
            return _chat(c, args, knobs)
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


def _tools(path: Path | None) -> list[dict] | None:
    if path is None:
        return None
    try:
        tools = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--tools: cannot read a JSON list of tool declarations from {str(path)!r} ({e})") from None
    if not isinstance(tools, list):
        raise ValueError(f"--tools: {str(path)!r} holds {type(tools).__name__}, not a list of tool declarations")
    return tools


def _chat(c: Client, args, knobs: dict) -> int:
    content = args.message
    if args.image or args.video:  # images and videos first, then the message
        content = [{"type": "image", "path": p, "visual_token_budget": args.visual_budget} for p in args.image]
        content += [{"type": "video", "path": p, "fps": args.video_fps, "visual_token_budget": args.frame_budget}
                    for p in args.video]
        content.append({"type": "text", "text": args.message})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    kw = {"seed": args.seed, "thinking": args.thinking, "request_id": args.request_id, **knobs}
    tools = _tools(args.tools)
    if args.stream:
        result, thinking_open = None, False
        for msg in c.chat_stream(messages, tools, **kw):
            if msg.HasField("delta") and not args.json:
                d = msg.delta
                if d.reasoning:
                    print(("" if thinking_open else "[thinking] ") + d.reasoning, end="", file=sys.stderr, flush=True)
                    thinking_open = True
                print(d.content, end="", flush=True)
            if msg.HasField("final"):
                result = msg.final
        if not args.json:
            print()
    else:
        result = c.chat(messages, tools, **kw)
        if not args.json:
            if result.reasoning:
                print(f"[thinking] {result.reasoning}", file=sys.stderr)
            print(result.content)
    out = _as_dict(result)
    out["token_ids"] = list(result.token_ids)
    if args.json:
        print(json.dumps(out))
    elif result.tool_calls:
        for t in result.tool_calls:
            print(f"[tool call {t.id}] {t.name}({t.arguments_json})")
    print(f"[request {result.request_id}: {result.finish_reason}, {len(result.token_ids)} tokens, "
          f"{result.stats.total_s:.2f}s]", file=sys.stderr)
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
