"""FP8 experts against bfloat16: accuracy, memory, load time and grouped GEMM time.

1. One MoE layer (the `bench` preset's shapes: hidden 512, expert width 256, 32 experts top-4; random weights
   scaled 1/sqrt(fan in), unit-scale rows, random routing) with FP8 experts (per-output-channel weight scales,
   per-token activation scales; kernels/fp8) against the same layer in bfloat16: `rel_error` (|y8 - y16| / |y16|)
   and `cosine`. Goals: rel_error <= 8e-2, cosine >= 0.995.
2. `memory_ratio`: resident expert bytes of the real 26B-A4B shapes in FP8 over bfloat16, from the loader's own
   readers on the meta device (goal <= 0.51).
3. `argmax_agreement`: the tiny model with a planted copy path (`confident` preset: logits peaked as a trained
   model's), bfloat16 with FP8 experts against bfloat16, the argmax of denoised canvases after a prompt
   (goal >= 0.9).
4. Load time of that checkpoint with experts quantized at load against as stored, and of the same model written
   already quantized (make-tiny --experts-dtype fp8: compressed-tensors FP8_DYNAMIC), and one MoE layer's grouped
   GEMMs (gate/up) in FP8 against bfloat16 on this device, naming the FP8 path that ran (`scaled`:
   torch._scaled_grouped_mm on sm90; `widened`: FP8 values in a float32 grouped GEMM, the CPU path: not a speed
   path, so its time is reported, never claimed).

    python benchmarks/fp8.py --quick
    python benchmarks/fp8.py --json --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOALS = {"rel_error": 8e-2, "cosine": 0.995, "memory_ratio": 0.51, "argmax_agreement": 0.9}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rows and canvases")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def moe_layer(rows: int, device: str) -> dict:
    from dgserve.model.moe import ExpertWeights, LocalExperts
    from dgserve.model.tiny import PRESETS

    p = PRESETS["bench"]
    E, K, D, I = p.num_experts, p.top_k_experts, p.hidden_size, p.moe_intermediate_size
    g = torch.Generator(device).manual_seed(0)
    gate_up = torch.randn(E, 2 * I, D, generator=g, device=device) / D ** 0.5
    down = torch.randn(E, D, I, generator=g, device=device) / I ** 0.5
    x = torch.randn(rows, D, generator=g, device=device).bfloat16()
    ids = torch.rand(rows, E, generator=g, device=device).topk(K, -1).indices
    w = torch.softmax(torch.randn(rows, K, generator=g, device=device), -1)
    bf16 = LocalExperts([ExpertWeights(gate_up.bfloat16(), down.bfloat16())], graph_safe=True)
    fp8 = LocalExperts([ExpertWeights.quantized(gate_up.bfloat16(), down.bfloat16())], graph_safe=True)
    y16, y8 = bf16(0, x, ids, w).float(), fp8(0, x, ids, w).float()
    return {"shape": {"experts": E, "top_k": K, "hidden": D, "expert_width": I, "rows": rows},
            "rel_error": float((y8 - y16).norm() / y16.norm()),
            "cosine": float(F.cosine_similarity(y8.flatten(), y16.flatten(), dim=0))}


def memory_ratio() -> dict:
    from dgserve.cluster.engine.fit import weight_bytes
    from dgserve.model.loader import read_experts
    from dgserve.model.tiny import real_config

    class MetaReader:
        def read(self, spec, dtype, rows=None):
            shape = spec.shape if rows is None else (len(rows), *spec.shape[1:])
            return torch.empty(shape, dtype=dtype, device="meta")

    cfg = real_config()
    ids = range(cfg.text.num_experts)
    held = {name: sum(w.nbytes() for w in read_experts(MetaReader(), cfg, torch.bfloat16, ids, name))
            for name in ("auto", "fp8")}
    assert held["fp8"] == weight_bytes(cfg, torch.bfloat16, attention=False, experts_dtype="fp8")
    return {"bf16_gb": held["auto"] / 1e9, "fp8_gb": held["fp8"] / 1e9, "memory_ratio": held["fp8"] / held["auto"]}


def argmax_and_load(canvases: int, device: str) -> dict:
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.tiny import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="dgserve-fp8-"))
    folder = make_tiny(tmp / "bf16", preset="confident")
    quantized = make_tiny(tmp / "fp8", preset="confident", experts_dtype="fp8")  # compressed-tensors FP8_DYNAMIC
    models, load_s = {}, {}
    for name, path, experts_dtype in (("auto", folder, "auto"), ("fp8", folder, "fp8"),
                                      ("prequantized", quantized, "auto")):
        t0 = time.perf_counter()
        models[name] = load_checkpoint(path, dtype="bfloat16", device=device, experts_dtype=experts_dtype).model
        load_s[name] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    C, total = models["auto"].config.canvas_length, 0
    agree = {"fp8": 0, "prequantized": 0}
    for _ in range(canvases):
        prompt = torch.randint(3, 1000, (40,), generator=g).to(device)
        canvas = torch.randint(3, 1000, (C,), generator=g).to(device)
        argmax = {}
        for name, m in models.items():
            kv = m.new_cache()
            m.encode(kv, prompt)
            argmax[name] = m.denoise(kv, canvas, None).argmax(-1)
        for name in agree:
            agree[name] += int((argmax[name] == argmax["auto"]).sum())
        total += C
    return {"argmax_agreement": agree["fp8"] / total, "prequantized_argmax_agreement": agree["prequantized"] / total,
            "positions": total, "load_s": {k: round(v, 3) for k, v in load_s.items()}}


def gemm_time(rows: int, device: str) -> dict:
    from dgserve.kernels.fp8 import quantize, scaled_grouped_backend, scaled_grouped_mm
    from dgserve.kernels.moe import grouped_mm
    from dgserve.model.moe import group_rows
    from dgserve.model.tiny import PRESETS

    p = PRESETS["bench"]
    E, D, I = p.num_experts, p.hidden_size, p.moe_intermediate_size
    g = torch.Generator(device).manual_seed(2)
    w = (torch.randn(E, 2 * I, D, generator=g, device=device) / D ** 0.5).bfloat16()
    w_q, w_s = quantize(w)
    _, offs = group_rows(torch.randint(0, E, (rows,), generator=g, device=device), E)
    x = torch.randn(rows, D, generator=g, device=device).bfloat16()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t0))
        return min(times)

    ms16, ms8 = best(lambda: grouped_mm(x, w, offs)), best(lambda: scaled_grouped_mm(x, w_q, w_s, offs))
    return {"rows": rows, "bf16_ms": round(ms16, 3), "fp8_ms": round(ms8, 3), "fp8_path": scaled_grouped_backend(
        torch.device(device)), "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    rows, canvases = (512, 4) if args.quick else (4096, 16)
    result = {"moe_layer": moe_layer(rows, args.device), "memory": memory_ratio(),
              "tiny_peaked": argmax_and_load(canvases, args.device), "grouped_gemm": gemm_time(rows, args.device)}
    figures = {"rel_error": result["moe_layer"]["rel_error"], "cosine": result["moe_layer"]["cosine"],
               "memory_ratio": result["memory"]["memory_ratio"],
               "argmax_agreement": result["tiny_peaked"]["argmax_agreement"]}
    met = {"rel_error": figures["rel_error"] <= GOALS["rel_error"], "cosine": figures["cosine"] >= GOALS["cosine"],
           "memory_ratio": figures["memory_ratio"] <= GOALS["memory_ratio"],
           "argmax_agreement": figures["argmax_agreement"] >= GOALS["argmax_agreement"]}
    result |= {**figures, "goals": GOALS, "met": met}
    print("FP8 experts against bfloat16")
    for k, v in figures.items():
        print(f"  {k:<17}{v:>10.4f}   goal {'<=' if k in ('rel_error', 'memory_ratio') else '>='} {GOALS[k]}"
              f"   {'met' if met[k] else 'NOT MET'}")
    m, t, gm = result["memory"], result["tiny_peaked"], result["grouped_gemm"]
    print(f"  experts of the real shapes: bf16 {m['bf16_gb']:.2f} GB, fp8 {m['fp8_gb']:.2f} GB")
    print(f"  load (tiny confident, bf16): as stored {t['load_s']['auto']} s, fp8 at load {t['load_s']['fp8']} s, "
          f"pre-quantized (compressed-tensors) {t['load_s']['prequantized']} s; its argmax agreement "
          f"{t['prequantized_argmax_agreement']:.3f}")
    print(f"  grouped gate/up GEMM, {gm['rows']} rows on {args.device} ({gm['threads']} threads): bf16 "
          f"{gm['bf16_ms']} ms, fp8 {gm['fp8_ms']} ms ({gm['fp8_path']})")
    if args.json:
        print(json.dumps(result))
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
