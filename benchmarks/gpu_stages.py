"""The stages of benchmarks/gpu_bench.py (see its docstring): each returns a JSON-able dict."""

from __future__ import annotations

import gc
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 1024 ** 3
# A mean entropy no canvas reaches: blocks never stop early (both sides accept only a float > 0)
NEVER_CONFIDENT = 1e-30


@dataclass(frozen=True)
class Sizes:
    config: str  # "real": the 26B-A4B shapes; "tiny": the tiny preset
    prompt: int
    blocks: int
    steps: int
    batches: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    rows: tuple[int, ...] = (1, 32)  # canvases of routed rows in the grouped GEMM check

    @classmethod
    def real(cls, quick: bool = False) -> Sizes:
        return cls("real", 4096, 2, 16, (1, 16) if quick else (1, 4, 16, 32))

    @classmethod
    def dry_run(cls) -> Sizes:
        return cls("tiny", 64, 2, 4, (1, 2), rows=(1, 2))

    def describe(self) -> dict:
        return {"config": self.config, "prompt": self.prompt, "blocks": self.blocks, "steps": self.steps,
                "batches": list(self.batches), "dtype": str(self.dtype).removeprefix("torch.")}

    def folder(self) -> Path:
        """A folder with config.json and generation_config.json (the tiny preset: a whole checkpoint)."""
        from dgserve.model.tiny import make_tiny, write_real_config

        folder = Path(tempfile.mkdtemp(prefix=f"dgserve-{self.config}-"))
        return write_real_config(folder) if self.config == "real" else make_tiny(folder)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int = 5) -> float:
    """Median milliseconds of fn() over reps, after one warm-up."""
    fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


def env(device: str) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        out |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / GiB, 1),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    return out


def kernels(sizes: Sizes, device: str) -> dict:
    from dgserve.kernels.moe import grouped_mm_backend
    from dgserve.model.config import load_model_config

    cfg = load_model_config(sizes.folder()).text
    g = torch.Generator(device).manual_seed(0)
    out = {"vocab": _vocab_check(cfg, sizes, device, g), "grouped_gemm": []}
    C = 256 if sizes.config == "real" else 32
    for canvases in sizes.rows:
        out["grouped_gemm"].append(_grouped_check(cfg, canvases, C, sizes.dtype, device, g))
    out["grouped_backend"] = grouped_mm_backend(torch.device(device), sizes.dtype)
    return out


def _vocab_check(cfg, sizes: Sizes, device: str, g) -> dict:
    from dgserve.kernels.vocab import vocab_pass
    from dgserve.model.sampler import entropy

    C, D, V = 256 if sizes.config == "real" else 32, cfg.hidden_size, cfg.vocab_size
    h = torch.randn(C, D, device=device, dtype=sizes.dtype, generator=g)
    embed = (torch.randn(V, D, device=device, dtype=sizes.dtype, generator=g) * D ** -0.5)
    temp = torch.full((C,), 0.8, device=device)
    keys = torch.randint(0, 2 ** 31 - 1, (C,), device=device, generator=g)

    def fused():
        return vocab_pass(h, embed, 30.0, temp, keys)

    def torch_ops():  # what the exact sampler runs: LM head, softcap, softmax, entropy, argmax, draw, p @ E
        z = torch.tanh(torch.nn.functional.linear(h, embed).float() / 30.0) * 30.0 / temp[:, None]
        p = torch.softmax(z, -1)
        return torch.multinomial(p, 1), z.argmax(-1), entropy(z), p.to(embed.dtype) @ embed

    a, b = fused(), torch_ops()
    agree = float((a.argmax_C == b[1]).float().mean())
    ms_fused, ms_torch = timed(fused, device), timed(torch_ops, device)
    return {"rows": C, "fused_ms": round(ms_fused, 3), "torch_ms": round(ms_torch, 3),
            "speedup": round(ms_torch / ms_fused, 2), "argmax_agreement": agree}


def _grouped_check(cfg, canvases: int, C: int, dtype: torch.dtype, device: str, g) -> dict:
    from dgserve.kernels.moe import grouped_mm
    from dgserve.kernels.moe.triton_grouped import grouped_mm_triton
    from dgserve.model.moe import group_rows

    E, D, I, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.top_k_experts
    P = canvases * C * K
    ids = torch.rand(canvases * C, E, device=device, generator=g).topk(K, -1).indices.reshape(-1)
    order, offs = group_rows(ids, E)
    x = torch.randn(P, D, device=device, dtype=dtype, generator=g)[order]
    w = torch.randn(E, 2 * I, D, device=device, dtype=dtype, generator=g) * D ** -0.5
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()

    def loop():
        out, s = x.new_empty(P, 2 * I), 0
        for e, n in enumerate(counts):
            out[s:s + n] = x[s:s + n] @ w[e].T
            s += n
        return out

    result = {"canvases": canvases, "rows": P, "loop_ms": round(timed(loop, device), 3)}
    ref = loop()
    sides = {"grouped": lambda: grouped_mm(x, w, offs)}
    if device.startswith("cuda"):
        sides["triton"] = lambda: grouped_mm_triton(x, w, offs)
    for name, fn in sides.items():
        result[f"{name}_ms"] = round(timed(fn, device), 3)
        result[f"{name}_max_diff"] = float((fn().float() - ref.float()).abs().max())
    result["flops_per_call"] = 2 * P * D * 2 * I
    return result


def dgserve(sizes: Sizes, device: str, bandwidth: float, peak: float, holder: dict) -> dict:
    """The engine at each batch, after a warm-up request; the model is left in `holder` for the reference stage."""
    return _model_levels(sizes, device, bandwidth, peak, sizes.batches, "auto", holder)


def fp8(sizes: Sizes, device: str, bandwidth: float, peak: float, bf16: dict) -> dict:
    """The same with FP8 experts (quantized as the random weights are made) at batch 1, 16 and 32, with HBM and
    speed against the bfloat16 levels."""
    batches = tuple(b for b in sizes.batches if b in (1, 16, 32)) or sizes.batches
    out = _model_levels(sizes, device, bandwidth, peak, batches, "fp8", {})
    by_batch = {lv["batch"]: lv for lv in bf16.get("levels", [])}
    for lv in out["levels"]:
        ref = by_batch.get(lv["batch"])
        if ref:
            lv["speed_vs_bf16"] = round(lv["decode_tok_s"] / ref["decode_tok_s"], 2)
            if "hbm_peak_gib" in lv and "hbm_peak_gib" in ref:
                lv["hbm_vs_bf16"] = round(lv["hbm_peak_gib"] / ref["hbm_peak_gib"], 3)
    return out


def _model_levels(sizes: Sizes, device: str, bandwidth: float, peak: float, batches: tuple[int, ...],
                  experts_dtype: str, holder: dict) -> dict:
    from benchmarks.gpu_roofline import active_params_per_row, step_floor
    from dgserve.cluster.engine.fit import weight_bytes
    from dgserve.model.config import load_generation_defaults, load_model_config
    from dgserve.model.random_init import random_model

    folder = sizes.folder()
    cfg = load_model_config(folder)
    t0 = time.perf_counter()
    keep = experts_dtype == "auto"  # the reference stage gets these very weights by name
    model, named = random_model(cfg, sizes.dtype, device, seed=0, names=True, experts_dtype=experts_dtype) if keep \
        else (random_model(cfg, sizes.dtype, device, seed=0, experts_dtype=experts_dtype), {})
    sync(device)
    build_s = time.perf_counter() - t0
    if keep:
        holder |= {"model": model, "named": named, "folder": folder}
    del named
    C, context = cfg.canvas_length, sizes.prompt + (sizes.blocks - 1) * cfg.canvas_length // 2  # mean context
    b1_floor = step_floor(cfg, sizes.dtype, 1, context, bandwidth, peak, experts_dtype)
    wbytes = weight_bytes(cfg, sizes.dtype, experts_dtype=experts_dtype)
    out = {"experts_dtype": experts_dtype, "build_s": round(build_s, 1), "weight_bytes": wbytes,
           "weight_gb": round(wbytes / 1e9, 2),
           "active_params_per_row": active_params_per_row(cfg), "bandwidth": bandwidth, "peak_flops": peak,
           # a block's commit shares a pass with the next block's first step: `steps` passes a block
           "ceiling_tok_s_b1": round(C / (sizes.steps * b1_floor.ms / 1000), 1), "levels": []}
    generation = load_generation_defaults(folder)
    _engine_level(model, generation, sizes, 1, device)  # warm-up: first-use costs of every shape
    _release(device)
    for batch in batches:
        level = _engine_level(model, generation, sizes, batch, device)
        _release(device)
        floor = step_floor(cfg, sizes.dtype, batch, context, bandwidth, peak, experts_dtype)
        level |= {"floor_ms": round(floor.ms, 2), "floor_bytes_ms": round(floor.bytes_ms, 2),
                  "floor_flops_ms": round(floor.flops_ms, 2), "bound": floor.bound,
                  "roofline_fraction": round(floor.ms / level["step_ms_p50"], 3)}
        out["levels"].append(level)
    b1 = next((lv for lv in out["levels"] if lv["batch"] == 1), None)
    if b1:
        out["b1_fraction_of_ceiling"] = round(b1["decode_tok_s"] / out["ceiling_tok_s_b1"], 3)
        for lv in out["levels"]:
            lv["gain_over_b1"] = round(lv["decode_tok_s"] / b1["decode_tok_s"], 2)
    return out


def _release(device: str) -> None:
    """Free what an engine left (its graphs' pools, caches) before the next measurement."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _settings(generation, sizes: Sizes, C: int):
    from dgserve.model.sampler import SamplerSettings

    # never stop early and no EOS: every request runs blocks x steps passes, on both sides of a comparison
    return SamplerSettings.from_defaults(generation, max_new_tokens=sizes.blocks * C, max_denoising_steps=sizes.steps,
                                         confidence_threshold=NEVER_CONFIDENT, eos_token_ids=())


def prompt_ids(sizes: Sizes, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, min(vocab, 200_000), (sizes.prompt - 1,), generator=g).tolist()


def _engine_level(model, generation, sizes: Sizes, batch: int, device: str) -> dict:
    from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest

    C = model.config.canvas_length
    settings = _settings(generation, sizes, C)
    config = EngineConfig(max_running=batch, max_queued=batch, prefill_chunk=min(4096, sizes.prompt),
                          max_prefill_tokens=max(8192, sizes.prompt))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(model, config)
    graphs = engine.executor.graphs
    try:
        streams = [engine.submit(EngineRequest(prompt_ids(sizes, model.config.text.vocab_size, i), settings, seed=i))
                   for i in range(batch)]
        steps, t0 = [], time.perf_counter()
        while not engine.idle:
            before = engine.metrics.time_s["prefill"]
            s0 = time.perf_counter()
            engine.step()
            sync(device)
            if engine.metrics.canvases_last_step == batch and engine.metrics.time_s["prefill"] == before:
                steps.append(1000 * (time.perf_counter() - s0))
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    results = [s.result(0) for s in streams]
    tokens = sum(len(r.token_ids) for r in results)
    step_ms = statistics.median(steps) if steps else float("nan")
    level = {"batch": batch, "tokens": tokens, "wall_s": round(wall, 2), "e2e_tok_s": round(tokens / wall, 1),
             # steady decoding: a block of C tokens per canvas every `steps` passes (commits ride along)
             "decode_tok_s": round(batch * C / (sizes.steps * step_ms / 1000), 1),
             "prefill_s": round(engine.metrics.time_s["prefill"], 2), "step_ms_p50": round(step_ms, 2),
             "decode_steps_timed": len(steps),
             "steps_per_block": sorted({s for r in results for s in r.stats.steps_per_block}),
             "token_ids_0": list(results[0].token_ids),
             "cuda_graphs": sorted(graphs.buckets) if graphs is not None else None}
    if device.startswith("cuda"):
        level["hbm_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
    return level


def reference(sizes: Sizes, device: str, holder: dict, ours: dict) -> dict:
    """transformers with dgserve's weights (copied by checkpoint name; dgserve's copy freed), batch 1."""
    from benchmarks.hf_weights import hf_with_weights

    if "model" not in holder:
        raise RuntimeError("needs the dgserve stage's model (run the dgserve stage first)")
    cfg, folder = holder.pop("model").config, holder["folder"]
    _release(device)  # only the named tensors hold dgserve's weights now, each freed as it is copied
    hf = hf_with_weights(folder, holder.pop("named"), sizes.dtype, device)
    _release(device)
    passes = []  # decoder passes, counted as benchmarks/generate.py does: an instance attribute over `forward`
    inner = hf.forward

    def counted(*args, **kwargs):
        passes.append(1)
        return inner(*args, **kwargs)

    hf.forward = counted
    prompt = torch.tensor([prompt_ids(sizes, cfg.text.vocab_size, 0)], device=device)
    kwargs = {"max_new_tokens": sizes.blocks * cfg.canvas_length, "max_denoising_steps": sizes.steps,
              "confidence_threshold": NEVER_CONFIDENT, "eos_token_id": None}

    def run():
        torch.manual_seed(0)
        with torch.inference_mode():
            return hf.generate(prompt, **kwargs)

    run()  # warm-up
    sync(device)
    passes.clear()
    t0 = time.perf_counter()
    out = run()
    sync(device)
    wall = time.perf_counter() - t0
    ids = out.sequences[0, prompt.shape[1]:].tolist()
    result = {"tokens": len(ids), "wall_s": round(wall, 2), "e2e_tok_s": round(len(ids) / wall, 1),
              "decoder_passes": len(passes), "same_passes": len(passes) == sizes.blocks * sizes.steps}
    b1 = next((lv for lv in ours.get("levels", []) if lv["batch"] == 1), None)
    if b1:
        same = sum(a == b for a, b in zip(ids, b1["token_ids_0"], strict=False))
        result |= {"speedup_e2e_b1": round(b1["e2e_tok_s"] / result["e2e_tok_s"], 2),
                   "same_token_count": len(ids) == b1["tokens"], "same_tokens_fraction": round(same / len(ids), 3)}
    return result  # the reference model is freed with this frame


def parity(device: str, out: Path, quick: bool = False) -> dict:
    """The CUDA-parity probe; `quick` (the dry run): 2 seeds of 2 blocks of 8 steps."""
    from benchmarks.parity_probe import probe

    return probe(device, out, seeds=2, blocks=2, steps=8) if quick else probe(device, out)


def table(data: dict) -> str:
    from benchmarks.gpu_table import render

    return render(data)
