"""The GPU check's benchmark (benchmarks/gpu_check.sh): the real 26B-A4B config with random weights made on the
GPU, in stages, each result written to `<out>/gpu_bench.json` as soon as it is measured (a run cut short still
reports what it reached), a table printed last.

Stages:
- env: device, memory, versions.
- kernels: the fused vocabulary pass against the torch sampler's ops on one canvas; one MoE layer's grouped GEMMs
  (torch._grouped_mm, the Triton kernel, a GEMM per expert) at 1 and 32 canvases of routed rows.
- dgserve: the engine at 1, 4, 16 and 32 concurrent requests (a 4,096-token prompt, 2 blocks of 16 steps each:
  early stopping and EOS are off, so every level does the same passes); decode tokens/s (generated tokens over
  the denoise, commit and sampling time), time per denoise step against the weight-read roofline, HBM peak.
- reference: transformers' DiffusionGemmaForBlockDiffusion with the very same weights (copied in by checkpoint
  name, then dgserve's copy freed), one request with the same prompt and passes; the end-to-end speed ratio.
- parity: the CUDA-parity diagnostics on the tiny checkpoint in float32 (parity_probe.py): teacher-forced
  logits against the reference, the random-number calls of both sides in order, tokens over seeds.

`--dry-run` runs every stage at tiny size on the CPU (the CI test of this script).

    python benchmarks/gpu_bench.py --out /tmp/gpu --device cuda      # on the GPU machine (gpu_check.sh)
    python benchmarks/gpu_bench.py --out /tmp/gpu --dry-run --json   # tiny, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_stages  # noqa: E402
from benchmarks.gpu_roofline import H200_BANDWIDTH, H200_BF16_PEAK  # noqa: E402


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="every stage at tiny size on the CPU")
    p.add_argument("--quick", action="store_true", help="batches 1 and 16 only")
    p.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="HBM bytes/s for the roofline")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK, help="bf16 FLOP/s for the roofline")
    p.add_argument("--stages", default="env,kernels,dgserve,reference,fp8,parity")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON line last")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    return args


class Report:
    """The result so far, rewritten to disk after every stage."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "stages": {}}
        self.save()

    def stage(self, name: str, fn, *args) -> dict | None:
        t0 = time.perf_counter()
        try:
            result = fn(*args)
            self.data["stages"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), **result}
        except Exception as e:  # a stage that fails is reported, and the later stages still run
            traceback.print_exc()
            self.data["stages"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}",
                                         "seconds": round(time.perf_counter() - t0, 2)}
            result = None
        self.save()
        return result

    def save(self) -> None:
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.rename(self.path)


def main(argv=None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = gpu_stages.Sizes.dry_run() if args.dry_run else gpu_stages.Sizes.real(args.quick)
    report = Report(args.out / "gpu_bench.json", {"dry_run": args.dry_run, "device": args.device,
                                                  "sizes": sizes.describe()})
    wanted = args.stages.split(",")
    if "env" in wanted:
        report.stage("env", gpu_stages.env, args.device)
    if "kernels" in wanted:
        report.stage("kernels", gpu_stages.kernels, sizes, args.device)
    holder: dict = {}  # the dgserve stage's model and weights, handed to the reference stage
    if "dgserve" in wanted:
        report.stage("dgserve", gpu_stages.dgserve, sizes, args.device, args.bandwidth, args.peak_flops, holder)
    if "reference" in wanted:
        report.stage("reference", gpu_stages.reference, sizes, args.device, holder,
                     report.data["stages"].get("dgserve", {}))
    holder.clear()
    gc.collect()
    if "fp8" in wanted:
        report.stage("fp8", gpu_stages.fp8, sizes, args.device, args.bandwidth, args.peak_flops,
                     report.data["stages"].get("dgserve", {}))
        gc.collect()
    if "parity" in wanted:
        report.stage("parity", gpu_stages.parity, args.device, args.out, args.dry_run)
    print(gpu_stages.table(report.data))
    if args.json:
        print(json.dumps(report.data))
    return 0 if all(s["status"] == "ok" for s in report.data["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
