"""The CUDA-parity diagnostics (the parity stage of gpu_bench.py), on any device, in float32, on the tiny checkpoint:

- teacher-forced logits: the same prompt encoded and the same canvas denoised by dgserve and by transformers;
- the random-number calls of one generate on each side, in order, with the generator's state after each (a CUDA
  generator's Philox offset, a CPU generator's state digest): equal sequences mean both sides consume the same
  random numbers in the same order, whatever ops draw them;
- generate over a few seeds: token-exact or not, and where the first difference is.

On CPU every figure must say "the same" (dgserve is token-exact there): the CI test of gpu_check.sh checks it, so
the probe itself is known to work before it runs on a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RANDOM_OPS = ("random", "randint", "exponential", "multinomial", "normal", "uniform", "bernoulli", "randn", "rand")


@dataclass(frozen=True)
class RngCall:
    op: str
    shape: tuple[int, ...]
    state: str  # the generator's state after the call


def _state(generator: torch.Generator) -> str:
    if generator.device.type == "cuda":
        return f"seed={generator.initial_seed()} offset={generator.get_offset()}"
    return hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()[:12]


class RngLog(TorchDispatchMode):
    """Records every random op run on this thread, with its generator's state after it."""

    def __init__(self):
        super().__init__()
        self.calls: list[RngCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__
        if any(k in name for k in RANDOM_OPS):
            t = out if isinstance(out, torch.Tensor) else args[0]
            gen = kwargs.get("generator")
            if gen is None:
                gen = (torch.cuda.default_generators[t.device.index or 0] if t.device.type == "cuda"
                       else torch.default_generator)
            self.calls.append(RngCall(name, tuple(t.shape), _state(gen)))
        return out


def _reference(folder: Path, device: str):
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device).eval()


@torch.inference_mode()
def _forced_logits(ref, ck, device: str) -> float:
    from transformers import DynamicCache

    prompt = torch.arange(2, 50, device=device)
    canvas = torch.arange(100, 100 + ck.config.canvas_length, device=device)
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=prompt[None], past_key_values=cache)
    expected = ref(past_key_values=cache, decoder_input_ids=canvas[None]).logits[0].float()
    kv = ck.model.new_cache()
    ck.model.encode(kv, prompt)
    return float((ck.model.denoise(kv, canvas, None) - expected).abs().max())


def _first_diff(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def _generate_both(ref, ck, device: str, seed: int, blocks: int, steps: int, log: bool):
    from dgserve.model.generate import generate
    from dgserve.model.sampler import SamplerSettings

    C = ck.config.canvas_length
    prompt = [2, 11 + seed, 12, 13, 14]
    ref_log, our_log = RngLog(), RngLog()
    torch.manual_seed(seed)
    with ref_log if log else contextlib.nullcontext():
        out = ref.generate(torch.tensor([prompt], device=device), max_new_tokens=blocks * C,
                           max_denoising_steps=steps)
    expected = out.sequences[0, len(prompt):].tolist()
    settings = SamplerSettings.from_defaults(ck.generation, max_new_tokens=blocks * C, max_denoising_steps=steps)
    with our_log if log else contextlib.nullcontext():  # noise drawn inline: a dispatch mode sees only its own thread
        got = generate(ck.model, prompt, settings, seed=seed, prefetch_noise=False).token_ids
    return expected, got, ref_log.calls, our_log.calls


def probe(device: str, out: Path | None = None, seeds: int = 3, blocks: int = 3, steps: int = 12) -> dict:
    from dgserve.model.loader import load_checkpoint
    from dgserve.model.tiny import make_tiny

    folder = make_tiny(Path(tempfile.mkdtemp(prefix="dgserve-parity-")))
    ref, ck = _reference(folder, device), load_checkpoint(folder, dtype="float32", device=device)
    result = {"logits_max_diff": _forced_logits(ref, ck, device), "seeds": []}
    for seed in range(seeds):
        expected, got, ref_calls, our_calls = _generate_both(ref, ck, device, seed, blocks, steps, log=seed == 0)
        result["seeds"].append({"seed": seed, "token_exact": expected == got, "first_diff": _first_diff(expected, got),
                                "tokens": len(got)})
        if seed == 0:
            logged = (ref_calls, our_calls)
            states = ([c.state for c in ref_calls], [c.state for c in our_calls])
            result["rng"] = {
                "reference_calls": len(ref_calls), "dgserve_calls": len(our_calls),
                "same_consumption": states[0] == states[1], "first_divergence": _first_diff(*states),
                "reference_ops": [f"{c.op}{list(c.shape)}" for c in ref_calls[:4]],
                "dgserve_ops": [f"{c.op}{list(c.shape)}" for c in our_calls[:4]]}
    result["token_exact_all"] = all(s["token_exact"] for s in result["seeds"])
    if out is not None:  # every call of both sides, for the hunt
        lines = [f"--- {side}\n" + "\n".join(f"{c.op} {list(c.shape)} {c.state}" for c in calls)
                 for side, calls in zip(("reference", "dgserve"), logged, strict=True)]
        (out / "parity_rng.txt").write_text("\n".join(lines) + "\n")
    return result
