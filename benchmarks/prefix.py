"""The prefix cache on a multi-turn workload: the engine with the cache off and on, the same conversations, the
same seeds, the same tokens.

4 conversations at once share a system prompt (--prompt-len, default 2,000 tokens: the fixed benchmark text,
<bos> first); each has --turns turns (default 6) of a 50-token user message and a whole-block reply (64 tokens,
the bench checkpoint's canvas). Turn t's prompt is the system prompt, every earlier user message and reply, and
the new message, as a chat resends its history; a conversation sends its next turn the moment its reply ends.
One process, the bench checkpoint (`make_tiny(preset="bench")`), float32, CPU; both sides run the same engine
settings with the same threads (--threads torch threads, the noise drawn inline, no sampler pool) and prefill
in chunks of 512 tokens. Reported per turn: time to the first block (submit to the first committed block, mean
over the conversations) and the prompt tokens encoded (prompt tokens less those taken from the cache, summed;
checked against the prefill rows the engine ran). Every reply must be the same token for token on both sides
(the script exits 1 with the first difference otherwise).
`prefix_speedup` = mean time to first block with the cache off over on, turns 2 to the last.

    python benchmarks/prefix.py --quick          # 3 turns, 2 steps a block
    python benchmarks/prefix.py --json           # 6 turns, 8 steps; + one JSON object on the last line
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

QUICK = {"prompt_len": 2000, "max_new_tokens": 64, "max_denoising_steps": 2, "repeats": 1}
FULL = {"prompt_len": 2000, "max_new_tokens": 64, "max_denoising_steps": 8, "repeats": 1}
CONVERSATIONS = 4
USER_TOKENS = 50
CHUNK = 512  # the engine's default prefill chunk
SIDES = ("off", "on")


def user_message(conversation: int, turn: int, vocab: int, media: set) -> list[int]:
    rng = random.Random(1000 * conversation + turn)
    return text_only([rng.randrange(4, vocab) for _ in range(USER_TOKENS)], media)


def text_only(ids, media: set) -> list[int]:
    """`ids` with image and video markers (which a text prompt may not hold) made a plain token: random user
    messages, and replies of random weights, as a chat would resend them as text."""
    return [5 if t in media else t for t in ids]


def run_side(ck, system: list[int], cache: bool, args, threads: common.Threads) -> dict:
    """All conversations to the end on a fresh engine; per conversation and turn: prompt length, tokens taken
    from the cache, time to first block, reply ids."""
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
    from dgserve.model.sampler import SamplerSettings

    settings = SamplerSettings.from_defaults(ck.generation, max_new_tokens=args.max_new_tokens,
                                             max_denoising_steps=args.max_denoising_steps)
    engine = Engine(ck.model, EngineConfig(max_running=CONVERSATIONS, prefill_chunk=args.prefill_chunk,
                                           max_prefill_tokens=max(2048, args.prefill_chunk), prefix_cache=cache,
                                           cpu_threads=threads.torch, sampler_threads=threads.sampler_threads,
                                           noise_prefetch=threads.prefetch))
    vocab = ck.config.text.vocab_size
    media = {ck.config.image_token_id, ck.config.boi_token_id, ck.config.eoi_token_id, ck.config.video_token_id}
    history = {c: list(system) for c in range(CONVERSATIONS)}
    turns: dict[int, list[dict]] = {c: [] for c in range(CONVERSATIONS)}
    live: dict[int, tuple[object, list[int]]] = {}

    def send(c: int) -> None:
        t = len(turns[c])
        prompt = history[c] + user_message(c, t, vocab, media)
        live[c] = (engine.submit(EngineRequest(prompt, settings, seed=args.seed + 100 * c + t,
                                               request_id=f"c{c}t{t}")), prompt)

    prefill_rows, peak_bytes = 0, 0
    t0 = time.perf_counter()
    for c in range(CONVERSATIONS):
        send(c)
    while live:
        out = engine.step()
        if out is not None:
            prefill_rows += out.rows.get("prefill", 0)
        peak_bytes = max(peak_bytes, engine.metrics.prefix_bytes)
        for c, (stream, prompt) in list(live.items()):
            if not stream.done:
                continue
            res = stream.result(0)
            turns[c].append({"prompt": len(prompt), "cached": res.stats.cached_tokens,
                             "ttfb_s": res.stats.time_to_first_block_s, "ids": list(res.token_ids)})
            history[c] = prompt + text_only(res.token_ids, media)  # the next turn resends the whole block
            del live[c]
            if len(turns[c]) < args.turns:
                send(c)
    wall = time.perf_counter() - t0
    m = engine.metrics
    engine.stop()
    return {"turns": turns, "wall_s": wall, "prefill_rows": prefill_rows, "hits": m.prefix.hits,
            "lookups": m.prefix.lookups, "evictions": m.prefix.evictions, "peak_prefix_bytes": peak_bytes,
            "entries": m.prefix_entries}


def per_turn(run: dict, turns: int) -> list[dict]:
    out = []
    for t in range(turns):
        rows = [run["turns"][c][t] for c in range(CONVERSATIONS)]
        out.append({"turn": t + 1, "prompt_tokens": sum(r["prompt"] for r in rows) / len(rows),
                    "encoded": sum(r["prompt"] - r["cached"] for r in rows),
                    "ttfb_s": sum(r["ttfb_s"] for r in rows) / len(rows)})
    return out


def report(config: dict, sides: dict[str, dict], turns: dict[str, list[dict]], speedup: dict) -> list[str]:
    lines = [f"prefix cache benchmark: {config['preset']} checkpoint, {CONVERSATIONS} conversations x "
             f"{config['turns']} turns, system prompt {config['prompt_len']} tokens, {USER_TOKENS}-token user "
             f"messages, {config['max_new_tokens']}-token replies, {config['max_denoising_steps']} steps a block, "
             f"prefill chunk {config['prefill_chunk']}, {config['device']} {config['dtype']}, "
             f"repeats {config['repeats']}"]
    rows = [("turn", "prompt tok", "encoded off", "encoded on", "TTFB off ms", "TTFB on ms", "off / on")]
    for off, on in zip(turns["off"], turns["on"], strict=True):
        rows.append((str(off["turn"]), f"{off['prompt_tokens']:.0f}", str(off["encoded"]), str(on["encoded"]),
                     f"{1000 * off['ttfb_s']:.0f}", f"{1000 * on['ttfb_s']:.0f}",
                     f"{off['ttfb_s'] / on['ttfb_s']:.2f}x"))
    lines += common.table(rows)
    for name, s in sides.items():
        lines.append(f"cache {name}: wall {s['wall_s']:.2f} s, prompt tokens encoded {s['encoded']} (prefill rows "
                     f"run {s['prefill_rows']}), hits {s['hits']} of {s['lookups']} requests, entries "
                     f"{s['entries']}, peak bytes held {s['peak_prefix_bytes'] / 2**20:.1f} MiB, evictions "
                     f"{s['evictions']}")
    lines.append(f"prefix_speedup (mean time to first block, cache off / on, turns 2-{config['turns']}): "
                 f"{common.fmt_spread(speedup, 'x')}")
    return lines


def extra_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--turns", type=int, default=None, help="turns per conversation (default 6; quick 3)")
    p.add_argument("--prefill-chunk", type=int, default=CHUNK,
                   help=f"prompt tokens per prefill chunk, the cache's granularity (default {CHUNK})")


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__, QUICK, FULL, argv, extra_flags)
    if args.turns is None:
        args.turns = 3 if args.quick else 6
    if args.turns < 2:
        raise SystemExit("--turns must be >= 2 (the speedup is over turns 2 and later)")
    load = common.LoadWatch()
    folder = common.ensure_checkpoint(args.bench_dir)
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(folder, dtype="float32")
    system = common.make_prompt(folder, args.prompt_len)
    threads = common.dgserve_threads(args.threads)
    config = {"preset": common.PRESET, "prompt_len": args.prompt_len, "turns": args.turns,
              "conversations": CONVERSATIONS, "user_tokens": USER_TOKENS, "max_new_tokens": args.max_new_tokens,
              "max_denoising_steps": args.max_denoising_steps, "prefill_chunk": args.prefill_chunk,
              "threads": args.threads, "repeats": args.repeats, "seed": args.seed, "quick": args.quick, "device": "cpu",
              "dtype": "float32", "torch": torch.__version__, "python": platform.python_version()}
    thread_lines, threads_json = common.threads_report(args.threads, common.DGSERVE_RULE,
                                                       {"cache off": threads, "cache on": threads})
    warm = argparse.Namespace(**{**vars(args), "turns": 1, "max_denoising_steps": 1})
    run_side(ck, system[:args.prefill_chunk], True, warm, threads)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for k in range(args.repeats):
        for side in SIDES if k % 2 == 0 else SIDES[::-1]:  # alternate which side runs first
            runs[side].append(run_side(ck, system, side == "on", args, threads))
    tokens = common.check_tokens(
        (f"repeat {k} conversation {c} turn {t + 1}", runs["off"][0]["turns"][c][t]["ids"],
         run["turns"][c][t]["ids"]) for side in SIDES for k, run in enumerate(runs[side])
        for c in range(CONVERSATIONS) for t in range(args.turns))
    load_json = load.finish(own=threads.total)

    def later_ttfb(run: dict) -> float:
        return sum(t["ttfb_s"] for t in per_turn(run, args.turns)[1:]) / (args.turns - 1)

    speedup = common.spread(common.pairwise_ratios([later_ttfb(r) for r in runs["off"]],
                                                   [later_ttfb(r) for r in runs["on"]]))
    median = {s: runs[s][[later_ttfb(r) for r in runs[s]].index(
        common.spread([later_ttfb(r) for r in runs[s]])["median"])] for s in SIDES}
    turns = {s: per_turn(median[s], args.turns) for s in SIDES}
    sides = {s: {k: v for k, v in median[s].items() if k != "turns"} | {"encoded": sum(t["encoded"]
                                                                                      for t in turns[s])}
             for s in SIDES}
    encoded_ok = all(sides[s]["encoded"] == sides[s]["prefill_rows"] for s in SIDES)
    lines = report(config, sides, turns, speedup) + thread_lines
    if not encoded_ok:
        lines.append("WARNING: prompt tokens encoded differ from the prefill rows the engine ran")
    lines += common.token_lines(tokens, "every turn of every conversation, cache off and on")
    print("\n".join(lines + common.load_lines(load_json)))
    if args.json:
        print(json.dumps({
            "config": config, "turns": turns, "sides": sides, "prefix_speedup": speedup["median"],
            "prefix_speedup_spread": speedup, "encoded_matches_prefill_rows": encoded_ok,
            "prompt_tokens_encoded": {s: sides[s]["encoded"] for s in SIDES}, "threads": threads_json,
            "same_tokens": tokens["same_tokens"], "mismatches": tokens["mismatches"], "load": load_json,
            "contended": load_json["contended"]}))
    return 1 if tokens["same_tokens"] is False or not encoded_ok else 0


if __name__ == "__main__":
    sys.exit(main())
