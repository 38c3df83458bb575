"""The vision tower on CPU: encode time per image at each visual token budget, and the share of a request's time
spent in vision.

One process, the bench checkpoint (`make_tiny(preset="bench")`: a tower of 4 layers, width 192, 4 heads; the text
model of benchmarks/generate.py), float32, --threads torch threads. The image is a fixed 768 x 1024 photo-like
PNG (smooth gradients and noise). Per budget: the image processor's time (decode, resize, patches: transformers'
Gemma 4 image processor, PIL backend) and the tower's (patches to soft tokens in the text width), medians of
--repeats runs, with the patch and soft-token counts. Then one request as `dgserve generate` runs it: the chat
prompt with the image at the checkpoint's default budget (280) and --max-new-tokens new tokens, and the parts of
its time: processing, the tower, prefill, denoising. `vision_share` = (processing + tower) / the request's time.
The same request without the image is run beside it to show what the image adds to the prefill.

    python benchmarks/vision.py --quick          # budgets 70 and 280, one run each, 2 steps a block
    python benchmarks/vision.py --json           # every budget, 3 runs, 8 steps; + one JSON object last
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

QUICK = {"prompt_len": 64, "max_new_tokens": 64, "max_denoising_steps": 2, "repeats": 1}
FULL = {"prompt_len": 64, "max_new_tokens": 64, "max_denoising_steps": 8, "repeats": 3}
QUICK_BUDGETS = (70, 280)
IMAGE_SIZE = (768, 1024)  # height, width


def photo(height: int, width: int) -> bytes:
    """A fixed PNG with the structure of a photo (gradients, shapes, noise) rather than pure noise."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 40) * np.cos(y / 55)], axis=-1) * 200
    rgb += np.random.default_rng(0).normal(0, 12, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def time_budgets(model, proc, data: bytes, budgets, repeats: int) -> list[dict]:
    from dgserve.model.vision import as_patches

    rows = []
    for budget in budgets:
        process_s, encode_s = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            item = proc.image(data, "image", budget)
            process_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = model.vision.encode([as_patches(item)])[0]
            encode_s.append(time.perf_counter() - t)
        assert out.shape == (item.soft_tokens, model.config.text.hidden_size)
        rows.append({"budget": budget, "patches": item.pixels.shape[0], "soft_tokens": item.soft_tokens,
                     "process_s": statistics.median(process_s), "encode_s": statistics.median(encode_s),
                     "encode_ms_per_soft_token": 1000 * statistics.median(encode_s) / item.soft_tokens})
    return rows


def one_request(ck, tok, proc, data: bytes | None, args) -> dict:
    from dgserve.model.generate import generate
    from dgserve.model.sampler import SamplerSettings
    from dgserve.model.tokenizer import chat_prompt_ids

    t0 = time.perf_counter()
    images = [proc.image(data, "image")] if data is not None else []
    process_s = time.perf_counter() - t0
    prompt = chat_prompt_ids(tok, "Describe this picture in a few words.", images=images)
    settings = SamplerSettings.from_defaults(ck.generation, max_new_tokens=args.max_new_tokens,
                                             max_denoising_steps=args.max_denoising_steps)
    res = generate(ck.model, prompt, settings, seed=args.seed, media=images)
    total = process_s + res.timings["total_s"]
    vision = process_s + res.timings["vision_s"]
    return {"prompt_tokens": len(prompt), "soft_tokens": sum(i.soft_tokens for i in images),
            "process_s": process_s, "vision_s": res.timings["vision_s"], "prefill_s": res.timings["prefill_s"],
            "denoise_s": res.timings["denoise_s"], "total_s": total, "vision_share": vision / total,
            "new_tokens": len(res.token_ids)}


def main(argv: list[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--budgets", type=lambda s: tuple(int(x) for x in s.split(",")),
                       help="comma-separated budgets (default: all five; quick 70,280)")

    args = common.parse_args(__doc__, QUICK, FULL, argv, extra)
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.media import BUDGETS, MediaProcessor
    from dgserve.model.tokenizer import load_tokenizer

    budgets = args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS)
    threads = common.dgserve_threads(args.threads)
    torch.set_num_threads(threads.torch)
    folder = common.ensure_checkpoint(args.bench_dir)
    ck = load_checkpoint(folder, dtype="float32")
    proc, tok = MediaProcessor.from_checkpoint(folder), load_tokenizer(folder)
    data = photo(*IMAGE_SIZE)
    load_before = os.getloadavg()[0]
    rows = time_budgets(ck.model, proc, data, budgets, args.repeats)
    with_image = one_request(ck, tok, proc, data, args)
    text_only = one_request(ck, tok, proc, None, args)
    thread_lines, thread_json = common.threads_report(args.threads, "one process, torch threads only",
                                                       {"dgserve": threads})
    vc = ck.config.vision
    lines = [f"vision tower: {vc.num_layers} layers, width {vc.hidden_size}, {vc.num_attention_heads} heads; "
             f"text width {ck.config.text.hidden_size}; float32 on CPU; image {IMAGE_SIZE[1]} x {IMAGE_SIZE[0]} "
             f"PNG ({len(data):,} bytes); median of {args.repeats} run(s)", *thread_lines, ""]
    lines += common.table([("budget", "patches", "soft tokens", "process ms", "encode ms", "encode ms/token")]
                          + [(str(r["budget"]), str(r["patches"]), str(r["soft_tokens"]),
                              f"{1000 * r['process_s']:.1f}", f"{1000 * r['encode_s']:.1f}",
                              f"{r['encode_ms_per_soft_token']:.3f}") for r in rows])
    w, t = with_image, text_only
    lines += ["", f"one request ({args.max_new_tokens} new tokens, {args.max_denoising_steps} steps a block):",
              f"  with the image ({w['soft_tokens']} soft tokens, {w['prompt_tokens']} prompt tokens): "
              f"{w['total_s']:.2f} s = processing {w['process_s']:.3f} + tower {w['vision_s']:.3f} + prefill "
              f"{w['prefill_s']:.3f} + denoising {w['denoise_s']:.2f} s",
              f"  text only ({t['prompt_tokens']} prompt tokens): {t['total_s']:.2f} s, prefill {t['prefill_s']:.3f} s",
              f"  vision_share (processing + tower over the request's time): {100 * w['vision_share']:.1f}%"]
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"benchmark": "vision", "quick": args.quick, "budgets": rows, "request": with_image,
                          "text_only_request": text_only, "vision_share": with_image["vision_share"],
                          "threads": thread_json, "load_before": load_before,
                          "vision_config": {"layers": vc.num_layers, "hidden": vc.hidden_size,
                                            "heads": vc.num_attention_heads},
                          "platform": platform.platform(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
