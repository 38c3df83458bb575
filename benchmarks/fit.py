"""Memory on one GPU for the real model, and the fused vocabulary pass's correctness and workspace.

1. Will it fit (planned from the real 26B-A4B config, nothing loaded; cluster/engine/fit.py): per device
   (H100 80 GB, H200 141 GB), weight dtype and sampler, the weights, the engine's budget (0.9 of the device less
   the weights and a 2 GiB reserve), bytes per request of --prompt-tokens + --new-tokens positions, the requests
   admitted at once, and the start-up check's verdict for --running requests.
2. The fused vocabulary pass (kernels/vocab): the workspace a real canvas (256 rows, hidden 2816, vocabulary
   262,144) needs on each path against the exact sampler's [C, V] noise, and the Triton kernel against its torch
   reference and the full-vocabulary definitions (max |diff| of lse, entropy and the self-conditioning input; equal
   argmax and sample) on small shapes. Without a GPU the kernel runs under Triton's interpreter on CPU
   (TRITON_INTERPRET=1, set here), so this checks correctness, not speed.

    python benchmarks/fit.py --quick
    python benchmarks/fit.py --json --running 64 --prompt-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table  # noqa: E402

GiB = 1 << 30
DEVICES = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}  # what the GPUs report


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller kernel check shapes")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--running", type=int, default=32, help="requests the verdict asks for (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    return p.parse_args(argv)


def plans(args) -> list[dict]:
    import torch

    from dgserve.cluster.engine.fit import plan_fit
    from dgserve.model.tiny import real_config

    cfg, out = real_config(), []
    for device, size in DEVICES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for fused in (True, False):
                p = plan_fit(cfg, dtype, size, running=args.running, prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new_tokens, fused=fused)
                out.append({"device": device, "dtype": str(dtype).removeprefix("torch."),
                            "sampler": "fused" if fused else "exact", "weights_gb": p.weights_bytes / 1e9,
                            "budget_gb": max(p.budget_bytes, 0) / 1e9, "request_mb": p.request_bytes / 1e6,
                            "admitted": p.canvases, "fits": p.fits, "verdict": p.verdict()})
    return out


def workspaces() -> dict:
    from dgserve.kernels.vocab.sizes import reference_workspace_bytes, triton_workspace_bytes

    C, D, V = 256, 2816, 262_144
    return {"triton_mb": triton_workspace_bytes(C, D) / 2**20, "torch_mb": reference_workspace_bytes(C, D, V) / 2**20,
            "exact_cv_mb": C * V * 4 / 2**20}


def kernel_check(quick: bool) -> dict:
    """The Triton kernel against the torch reference and the definitions, on small ragged shapes."""
    import torch

    try:
        from dgserve.kernels.vocab.triton_vocab import vocab_pass_triton
    except ImportError:
        return {"skipped": "Triton is not installed"}
    from dgserve.kernels.vocab import row_keys, vocab_pass_reference
    from dgserve.kernels.vocab.noise import gumbel

    R, V, D = (20, 150, 40) if quick else (64, 1000, 96)
    g = torch.Generator().manual_seed(0)
    h, e = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    temp, keys = torch.rand(R, generator=g) + 0.3, row_keys(7, R)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = vocab_pass_triton(h.to(dev), e.to(dev), 30.0, temp.to(dev), keys.to(dev))
    ref = vocab_pass_reference(h, e, 30.0, temp, keys, chunk=64)
    z = torch.tanh(h @ e.T / 30.0) * 30.0 / temp.unsqueeze(-1)
    p = torch.softmax(z, -1)
    full = {"lse": torch.logsumexp(z, -1), "entropy": -(p * torch.log_softmax(z, -1)).sum(-1), "soft": p @ e}
    out = {"shape": [R, V, D], "device": dev, "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}
    for name, attr in (("lse", "lse_C"), ("entropy", "entropy_C"), ("soft", "soft_CD")):
        out[f"{name}_vs_torch"] = float((getattr(got, attr).cpu() - getattr(ref, attr)).abs().max())
        out[f"{name}_vs_definition"] = float((getattr(got, attr).cpu() - full[name]).abs().max())
    out["argmax_equal"] = bool(torch.equal(got.argmax_C.cpu(), z.argmax(-1)))
    out["sample_equal"] = bool(torch.equal(got.sample_C.cpu(), (z + gumbel(keys, torch.arange(V))).argmax(-1)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    rows, ws, kernel = plans(args), workspaces(), kernel_check(args.quick)
    print(f"Will it fit: the real model, {args.running} requests of {args.prompt_tokens} + {args.new_tokens} "
          "positions, budget = 0.9 x device - weights - 2 GiB")
    print("\n".join(table([["device", "dtype", "sampler", "weights GB", "budget GB", "MB/request", "admitted",
                            "fits"]] + [[r["device"], r["dtype"], r["sampler"], f"{r['weights_gb']:.1f}",
                                         f"{r['budget_gb']:.1f}", f"{r['request_mb']:.0f}", str(r["admitted"]),
                                         "yes" if r["fits"] else "no"] for r in rows])))
    for r in rows:
        if r["dtype"] == "bfloat16" and r["sampler"] == "fused":
            print(f"  start-up check, {r['device']} bf16: {r['verdict']}")
    print(f"Fused vocabulary pass workspace per real canvas: Triton {ws['triton_mb']:.1f} MiB, torch path "
          f"{ws['torch_mb']:.1f} MiB, against {ws['exact_cv_mb']:.0f} MiB of [C, V] float32 noise (exact sampler)")
    if "skipped" in kernel:
        print(f"Kernel check: skipped ({kernel['skipped']})")
    else:
        how = "under Triton's interpreter on CPU" if kernel["interpreted"] else f"on {kernel['device']}"
        print(f"Kernel check {how}, rows x vocab x hidden {kernel['shape']}: max |diff| vs torch reference: lse "
              f"{kernel['lse_vs_torch']:.1e}, entropy {kernel['entropy_vs_torch']:.1e}, soft "
              f"{kernel['soft_vs_torch']:.1e}; vs definitions: lse {kernel['lse_vs_definition']:.1e}, entropy "
              f"{kernel['entropy_vs_definition']:.1e}, soft {kernel['soft_vs_definition']:.1e}; argmax equal "
              f"{kernel['argmax_equal']}, sample equal {kernel['sample_equal']}")
    if args.json:
        print(json.dumps({"plans": rows, "workspace": ws, "kernel": kernel}))
    ok = "skipped" in kernel or (kernel["argmax_equal"] and kernel["sample_equal"] and kernel["soft_vs_torch"] < 1e-4)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
