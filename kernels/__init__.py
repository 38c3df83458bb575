"""Kernels of the user's design: each in Triton beside a plain-torch reference, the Triton one chosen at run time
on CUDA (`dispatch.py`), every one tested on CPU against its reference under Triton's interpreter
(`TRITON_INTERPRET=1`). This package never imports `dgserve.model`: the model calls kernels, not the reverse.

- `vocab`: the fused vocabulary pass (LM head, softcap, temperature, entropy, argmax, a Gumbel-max sample and the
  self-conditioning input `softmax(Z) @ E` in one pass over the tied embedding, online over vocabulary chunks).
- `moe`: grouped expert GEMMs with the group offsets on the device (torch._grouped_mm, or a Triton kernel).
- `fp8`: FP8 experts: per-channel weight and per-token activation quantization, scaled grouped GEMMs.
"""
