"""Weight dtype names (torch-free: the relaying replicas read topologies without importing torch)."""

from __future__ import annotations

AUTO = "auto"


def resolve_dtype(name: str, device: str) -> str:
    """`auto`: bfloat16 on CUDA (the checkpoint's own dtype: 50.5 GB for the real text model, against 101 GB in
    float32), float32 on CPU (token-exact with the reference there). Any other name is returned as is."""
    if name != AUTO:
        return name
    return "bfloat16" if str(device).startswith("cuda") else "float32"


# The routed experts' storage: "auto" (the weights' dtype) or "fp8" (float8_e4m3fn, per-output-channel scales,
# activations quantized per token at run time; kernels/fp8).
EXPERTS_DTYPES = ("auto", "fp8")
