"""The `dgserve` command line: `make-tiny` and `generate` (one process, no Ray)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from dgserve.model.errors import DGServeError, InputError


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from e


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, help="new tokens; output grows by whole canvases")
    g.add_argument("--max-denoising-steps", type=int)
    g.add_argument("--entropy-bound", type=float)
    g.add_argument("--t-min", type=float)
    g.add_argument("--t-max", type=float)
    g.add_argument("--stability-threshold", type=int)
    g.add_argument("--confidence-threshold", type=float)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dgserve", description="Serve DiffusionGemma with Ray.")
    sub = ap.add_subparsers(dest="command", required=True)

    mt = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the real layout")
    mt.add_argument("dir", type=Path)
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--preset", default="tiny", help="tiny (default) | bench | confident (blocks stop early)")
    mt.add_argument("--shards", type=int, default=3)
    mt.add_argument("--experts-dtype", default="auto",
                    help="auto | fp8: experts already quantized, as a compressed-tensors FP8_DYNAMIC checkpoint")

    gen = sub.add_parser("generate", help="generate in this process (no Ray)")
    gen.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded tiny model)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="user message; the checkpoint's chat template is applied")
    src.add_argument("--prompt-ids", type=_ids, help="raw token ids, e.g. 2,651,1234")
    src.add_argument("--prompts-file", type=Path,
                     help="JSON Lines of requests run together through the engine; one JSON line out per request")
    gen.add_argument("--thinking", action="store_true", help="chat template in thinking mode")
    m = gen.add_argument_group("images and video (with --prompt; the tower runs in this process)")
    m.add_argument("--image", action="append", type=Path, default=[], help="a PNG, JPEG or WebP file (repeatable)")
    m.add_argument("--video", action="append", type=Path, default=[],
                   help="a video file, decoded with PyAV and sampled at --video-fps (repeatable)")
    m.add_argument("--visual-budget", type=int, help="soft tokens an image: 70 | 140 | 280 | 560 | 1120 "
                                                      "(default: the checkpoint's, 280)")
    m.add_argument("--frame-budget", type=int, help="soft tokens a video frame (default: the checkpoint's, 70)")
    m.add_argument("--video-fps", type=float, default=1.0, help="frames sampled a second of video (default 1)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    gen.add_argument("--experts-dtype", default="auto",
                     help="auto (as --dtype) | fp8 (routed experts quantized at load, per output channel)")
    gen.add_argument("--device", default="cpu", help="cpu | cuda")
    gen.add_argument("--threads", type=int, default=1,
                     help="torch CPU threads (default 1, as the engine: the same thread count gives the same tokens)")
    gen.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    gen.add_argument("--attention-ranks", type=int, default=1,
                     help="split over local processes: this many attention ranks (topology: attention_ranks)")
    gen.add_argument("--expert-ranks", type=int, default=0,
                     help="... and this many expert ranks holding the routed experts, reached by all-to-all "
                          "(topology: expert_ranks; 0: experts in every attention rank)")
    gen.add_argument("--max-running", type=int, default=16, help="--prompts-file: requests denoised at once")
    gen.add_argument("--memory-budget-bytes", type=int, help="--prompts-file: the engine's memory budget")
    _add_sampler_args(gen)

    sv = sub.add_parser("serve", help="the endpoint: gRPC gateway + engine units on Ray, until Ctrl-C")
    sv.add_argument("--config", type=Path, help="topology YAML (default: the embedded tiny model, one unit)")
    sv.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    sv.add_argument("--host", help="gateway host (default: the topology's, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="gateway port (default: the topology's, 50051)")
    sv.add_argument("--http-host", help="the OpenAI-compatible HTTP API's host (default: the topology's, 127.0.0.1)")
    sv.add_argument("--http-port", type=int, help="the HTTP API's port (default: the topology's, 8000)")
    sv.add_argument("--no-http", action="store_true", help="serve gRPC only (no HTTP proxy)")
    sv.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of a local Ray cluster (default 8)")
    sv.add_argument("--temp-dir", default=None, help="a local Ray cluster's temp folder (default /tmp/dgray)")
    sv.add_argument("--metrics-port", type=int, default=9464,
                    help="a local Ray cluster's Prometheus metrics port (default 9464; 0: off)")
    g = sv.add_argument_group("gateway security (override the topology's gateway section)")
    g.add_argument("--api-keys-file", help="API keys, one per line (e.g. a mounted Kubernetes Secret); every call "
                                           "but health then needs 'authorization: Bearer <key>'")
    g.add_argument("--tls-cert", help="the gateway's TLS certificate chain (PEM); with --tls-key")
    g.add_argument("--tls-key", help="the gateway's TLS private key (PEM)")
    g.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS)")
    g.add_argument("--insecure-remote", action="store_true",
                   help="allow a plaintext gateway on a non-loopback --host (only behind something that encrypts)")
    sv.add_argument("--ray-token-file", default=None,
                    help="Ray's token authentication with the token in this file (e.g. a mounted Kubernetes Secret; "
                         "default: Ray's own RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, if set). The driver presents it "
                         "to a joined cluster; a local cluster requires it")
    dp = sub.add_parser("drain-pod", help="a Kubernetes preStop hook: drain this pod's gateway and/or Ray node")
    dp.add_argument("--grace", type=float, required=True, help="seconds the drain may take (under the pod's "
                                                               "terminationGracePeriodSeconds)")
    dp.add_argument("--gateway-file", help="the topology's gateway.drain_file: the fronts here drain when it "
                                           "appears, and this waits for their reports")
    from dgserve.cluster.drain import FRONTS

    dp.add_argument("--front", action="append", choices=FRONTS, default=None,
                    help="a front whose report to wait for (repeatable; default: gateway)")
    dp.add_argument("--ray", action="store_true", help="drain this Ray node (Serve moves its replicas away "
                                                       "gracefully) and wait for its Serve replicas to leave")
    fc = sub.add_parser("fabric-check", help="the expert all-to-all across pods (the Helm chart's helm test hook)")
    from dgserve.cluster.experts.fabric_check import add_arguments

    add_arguments(fc)
    return ap


def _progress_printer(stream):
    def show(p) -> None:
        if p.committed is not None:
            stream.write(f"\rblock {p.block + 1}/{p.blocks}: committed after {p.step} steps{' ' * 20}\n")
        else:
            stream.write(f"\rblock {p.block + 1}/{p.blocks}: step {p.step}/{p.max_steps}")
        stream.flush()
    return show


def _sampler_overrides(args) -> dict:
    from dgserve.model.settings import KNOBS

    return {k: getattr(args, k) for k in KNOBS}


def cmd_generate_file(args) -> int:
    from dgserve.cluster.batch import engine_for_file, read_requests, run_batch
    from dgserve.model.hub import default_model_dir
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer

    ck = load_checkpoint(args.model or default_model_dir(), dtype=args.dtype, device=args.device,
                         experts_dtype=args.experts_dtype)
    tok = load_tokenizer(ck.folder)
    requests = read_requests(args.prompts_file, {**_sampler_overrides(args), "seed": args.seed}, ck.generation,
                             tok, chat_prompt_ids)
    engine = engine_for_file(ck.model, tok, len(requests), args.max_running, args.memory_budget_bytes,
                             args.threads)
    failed = run_batch(engine, requests, lambda obj: print(json.dumps(obj), flush=True))
    print(f"[{len(requests)} requests, {failed} failed, {engine.metrics.iterations} engine iterations]",
          file=sys.stderr)
    return 1 if failed else 0


def cmd_generate(args) -> dict:
    from dgserve.model.generate import generate
    from dgserve.model.hub import default_model_dir
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.sampler import SamplerSettings
    from dgserve.model.tokenizer import decode, load_tokenizer

    if (args.attention_ranks, args.expert_ranks) != (1, 0):
        if args.image or args.video:
            raise InputError("image", "images and videos run in one process here (the split's ranks take text "
                                      "prompts); serve the model to send them to a cluster")
        return _generate_split(args)
    t0 = time.perf_counter()
    ck = load_checkpoint(args.model or default_model_dir(), dtype=args.dtype, device=args.device,
                         experts_dtype=args.experts_dtype)
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(ck.folder)
    images, videos = _media(args, ck.folder)
    prompt = _prompt(args, tok, (images, videos))
    settings = SamplerSettings.from_defaults(ck.generation, **_sampler_overrides(args))
    show = _progress_printer(sys.stderr) if sys.stderr.isatty() and not args.json else None
    media = images + [f for v in videos for f in v.frames]
    res = generate(ck.model, prompt, settings, seed=args.seed, on_progress=show, media=media)
    text = decode(tok, res.token_ids, settings.pad_token_id)
    return {
        "model": str(ck.folder), "experts_dtype": args.experts_dtype, "prompt_tokens": len(prompt),
        "images": len(images), "video_frames": sum(len(v.frames) for v in videos),
        "token_ids": res.token_ids, "text": text,
        "finish_reason": res.finish_reason, "steps_per_block": res.steps_per_block,
        "decoder_passes": res.decoder_passes, "tokens_per_forward": res.tokens_per_forward,
        "timings": {"load_s": load_s, **res.timings},
        "tokens_per_second": len(res.token_ids) / res.timings["total_s"] if res.timings["total_s"] else None,
    }


def _prompt(args, tok, media: tuple = ((), ())) -> list[int]:
    from dgserve.model.tokenizer import chat_prompt_ids

    if args.prompt_ids is not None:
        return args.prompt_ids
    if args.prompt is not None:
        return chat_prompt_ids(tok, args.prompt, enable_thinking=args.thinking, images=media[0], videos=media[1])
    raise InputError("prompt", "give --prompt TEXT or --prompt-ids IDS")


def _media(args, folder) -> tuple[list, list]:
    """--image and --video files, processed with the checkpoint's processor files."""
    if not (args.image or args.video):
        return [], []
    if args.prompt is None:
        raise InputError("image", "images and videos go with --prompt (the chat template places them)")
    from dgserve.model.media import MediaProcessor

    proc = MediaProcessor.from_checkpoint(folder)
    images = [proc.image(_read_file(p, "image"), f"--image {p}", args.visual_budget) for p in args.image]
    videos = [proc.video(_read_file(p, "video"), f"--video {p}", args.frame_budget, args.video_fps)
              for p in args.video]
    return images, videos


def _read_file(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(flag, f"{path}: {e.strerror}") from e


def _generate_split(args) -> dict:
    """`generate` over --attention-ranks + --expert-ranks local processes (gloo): the same JSON contract."""
    from dgserve.cluster.experts.local import SplitRequest, check_ranks, generate_split
    from dgserve.model.config import load_generation_defaults, load_model_config
    from dgserve.model.generate import validate_prompt
    from dgserve.model.hub import default_model_dir, resolve_checkpoint
    from dgserve.model.settings import SamplerSettings
    from dgserve.model.tokenizer import decode, load_tokenizer

    check_ranks(args.attention_ranks, args.expert_ranks)
    if args.device != "cpu":
        raise InputError("device", "the split in local processes runs on CPU (gloo); on GPUs it runs in an engine "
                                   "unit of `dgserve serve` (one rank per GPU)")
    folder = resolve_checkpoint(args.model or default_model_dir())
    tok = load_tokenizer(folder)
    prompt = _prompt(args, tok)
    overrides = _sampler_overrides(args)
    settings = SamplerSettings.from_defaults(load_generation_defaults(folder), **overrides)  # checked here
    validate_prompt(prompt, load_model_config(folder), settings.max_new_tokens)  # ... and so is the prompt
    t0 = time.perf_counter()
    [res] = generate_split(folder, [SplitRequest(tuple(prompt), overrides, args.seed)], args.attention_ranks,
                           args.expert_ranks, args.dtype, experts_dtype=args.experts_dtype)
    total = time.perf_counter() - t0
    passes = sum(res.steps_per_block)
    return {
        "model": str(folder), "prompt_tokens": len(prompt), "token_ids": list(res.token_ids),
        "text": decode(tok, list(res.token_ids), settings.pad_token_id), "finish_reason": res.finish_reason,
        "steps_per_block": list(res.steps_per_block), "decoder_passes": passes,
        "tokens_per_forward": len(res.token_ids) / passes if passes else 0.0,
        "timings": {"total_s": total}, "tokens_per_second": len(res.token_ids) / total if total else None,
        "ranks": {"attention_ranks": args.attention_ranks, "expert_ranks": args.expert_ranks},
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from dgserve.cluster.serve import run

            return run(args)
        if args.command == "fabric-check":
            from dgserve.cluster.experts.fabric_check import run as fabric_check

            return fabric_check(args)
        if args.command == "drain-pod":
            from dgserve.cluster.drain import drain_pod

            for line in drain_pod(args.grace, args.gateway_file, args.ray, tuple(args.front or ["gateway"])):
                print(line, flush=True)
            return 0
        if args.command == "make-tiny":
            from dgserve.model.tiny import make_tiny

            folder = make_tiny(args.dir, seed=args.seed, preset=args.preset, num_shards=args.shards,
                               experts_dtype=args.experts_dtype)
            print(f"wrote tiny checkpoint ({args.preset}, seed {args.seed}) to {folder}")
            return 0
        import torch  # here, not at the top: `drain-pod` and `fabric-check` start fast without it

        if args.device != "cpu" and not torch.cuda.is_available():
            raise InputError("device", f"{args.device!r} requested but no CUDA device is available")
        if args.threads < 1:
            raise InputError("threads", f"{args.threads} is not an integer >= 1")
        from dgserve.model.loader import check_experts_dtype

        check_experts_dtype(args.experts_dtype)
        torch.set_num_threads(args.threads)
        if args.prompts_file is not None:
            return cmd_generate_file(args)
        out = cmd_generate(args)
    except DGServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(out["text"] if out["text"] is not None else " ".join(map(str, out["token_ids"])))
        print(f"[{len(out['token_ids'])} tokens, steps per block {out['steps_per_block']}, "
              f"{out['tokens_per_forward']:.2f} tokens/forward, {out['timings']['total_s']:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
