"""The entropy-bound block-diffusion sampler (MODEL_SPEC 4.1), token-exact with the reference.

Per request, one `torch.Generator` is consumed in the reference's order: one `randint` canvas per block, then per
step one multinomial draw over the canvas (the CPU kernel draws exponential noise over [C, V]) and one `randint`
renoise. Everything (entropy, sampling, argmax, stopping, self-conditioning) uses the tempered logits.
Self-conditioning keeps the soft embedding [C, D], never the logits.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dgserve.kernels.vocab import VocabOut, row_keys

from .settings import KNOBS, MAX_DENOISING_STEPS, MAX_SEED, SamplerSettings

__all__ = ["KNOBS", "MAX_DENOISING_STEPS", "MAX_SEED", "BlockDenoiser", "NoiseStream", "SamplerSettings", "entropy",
           "finalize_block"]

def entropy(z_CV: torch.Tensor) -> torch.Tensor:
    """Per-position entropy in nats, computed exactly as `torch.distributions.Categorical(logits=z).entropy()`."""
    logits = z_CV - z_CV.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)
    return -(torch.clamp(logits, min=torch.finfo(logits.dtype).min) * probs).sum(-1)


_NOISE_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgserve-noise")


class NoiseStream:
    """A request's random draws, in the reference's order: a canvas per block; per step, exponential noise
    over [C, V] (what the CPU multinomial draws) then a renoise canvas.

    The draws never depend on the logits, so on CPU a step's draws are made on a worker thread while that
    step's forward runs. A step's draws are requested only once the previous step decided to continue, so
    nothing is drawn that the reference would not draw. On CUDA the draws are plain (kernel launches are
    asynchronous already) and sampling calls torch.multinomial itself.
    """

    def __init__(self, generator: torch.Generator, canvas_length: int, vocab_size: int, prefetch: bool = True,
                 fused: bool = False):
        """`fused`: the fused vocabulary pass samples (kernels.vocab): per step the generator draws one 31-bit
        seed for the canvas's counter-based Gumbel noise, then the renoise canvas; no [C, V] noise exists."""
        self.generator, self.C, self.V, self.fused = generator, canvas_length, vocab_size, fused
        self.on_cpu = generator.device.type == "cpu"
        self.prefetch = prefetch and self.on_cpu and not fused
        self._pending: Future | None = None

    def canvas(self) -> torch.Tensor:
        if self._pending is not None:
            raise RuntimeError("a step's random draws are still outstanding; the draw order would change")
        return self._randint()

    def _randint(self) -> torch.Tensor:
        # Shape (1, C) as the reference draws it; the values are the same as for (C,).
        return torch.randint(0, self.V, (1, self.C), generator=self.generator, device=self.generator.device)[0]

    def _step_draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(self.C, self.V, device=self.generator.device).exponential_(1, generator=self.generator)
        return q, self._randint()

    def step_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fused step's draws: the canvas rows' noise keys [C] and the renoise canvas [C] (on the generator's
        device; nothing read back)."""
        seed = torch.randint(0, 2**31 - 1, (1,), generator=self.generator, device=self.generator.device)
        return row_keys(seed, self.C), self._randint()

    def request_step(self) -> None:
        if self.prefetch:
            self._pending = _NOISE_WORKER.submit(self._step_draws)

    def sample(self, probs_CV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate tokens [C] (bitwise what torch.multinomial(probs, 1) draws) and the renoise canvas [C]."""
        if not self.on_cpu:
            sampled = torch.multinomial(probs_CV, num_samples=1, generator=self.generator).squeeze(-1)
            return sampled, self._randint()
        if self._pending is not None:
            q, renoise = self._pending.result()
            self._pending = None
        else:
            q, renoise = self._step_draws()
        # torch.multinomial with one sample is argmax(p / q), q ~ Exp(1) drawn over the whole [C, V].
        return torch.argmax(probs_CV / q, dim=-1), renoise


@dataclass
class StepResult:
    argmax_C: torch.Tensor
    accepted: int
    mean_entropy: float
    stop: bool


@dataclass
class BlockDenoiser:
    """The diffusion state of one block of one request: canvas, self-conditioning, argmax history."""

    settings: SamplerSettings
    noise: NoiseStream
    temps: torch.Tensor
    canvas_C: torch.Tensor = field(init=False)
    soft_source_CV: torch.Tensor | None = field(init=False, default=None)  # probs whose soft embedding is next
    argmax_C: torch.Tensor | None = field(init=False, default=None)
    steps: int = field(init=False, default=0)
    done: bool = field(init=False, default=False)
    _history: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.canvas_C = self.noise.canvas()
        self.noise.request_step()

    @property
    def remaining(self) -> int:
        """The reference's step index n, counting down from N to 1."""
        return self.settings.max_denoising_steps - self.steps

    @property
    def temperature(self) -> torch.Tensor:
        """This step's temperature (a 0-d float32 tensor)."""
        return self.temps[self.remaining]

    def step(self, logits_CV: torch.Tensor, sc_dtype: torch.dtype) -> StepResult:
        z = logits_CV / self.temperature.to(logits_CV.device)
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)
        sampled, renoise = self.noise.sample(probs)
        # Next step's self-conditioning: softmax of the tempered logits cast to the embedding dtype. In float32
        # that cast is the identity, so the sampling probabilities are reused.
        self.soft_source_CV = probs if sc_dtype == torch.float32 else torch.softmax(
            z.to(sc_dtype), dim=-1, dtype=torch.float32)
        return self._advance(sampled, renoise, torch.argmax(z, dim=-1), entropy(z))

    def step_fused(self, out: VocabOut, renoise_C: torch.Tensor) -> StepResult:
        """A step from the fused vocabulary pass's results (its sample, argmax and entropy of the tempered logits;
        its self-conditioning input is the caller's to keep)."""
        return self._advance(out.sample_C, renoise_C, out.argmax_C, out.entropy_C)

    def _advance(self, sampled: torch.Tensor, renoise: torch.Tensor, argmax: torch.Tensor,
                 h: torch.Tensor) -> StepResult:
        """Accept the lowest-entropy positions within the bound, renoise the rest, and decide whether to stop."""
        s = self.settings
        sorted_h, order = torch.sort(h, dim=-1, descending=False)
        keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= s.entropy_bound
        accept = torch.scatter(torch.zeros_like(keep_sorted), -1, order, keep_sorted)
        accepted = torch.where(accept, sampled, self.canvas_C)
        self.canvas_C = torch.where(~accept, renoise, accepted)

        stable = self._stable(argmax)
        mean_h = float(h.mean())
        confident = mean_h < s.confidence_threshold
        self.argmax_C = argmax
        self.steps += 1
        self.done = (stable and confident) or self.steps >= s.max_denoising_steps
        if not self.done:
            self.noise.request_step()
        return StepResult(argmax, int(accept.sum()), mean_h, stable and confident)

    def _stable(self, argmax_C: torch.Tensor) -> bool:
        # Stable needs k earlier argmaxes in the history, so at step s only when s - 1 >= k: a threshold at or
        # above the step cap can never be met, exactly as one equal to the cap. Capping it bounds the history to
        # [max_denoising_steps, C] whatever a request asks (2^32 - 1 would be a 1 TiB tensor), same tokens.
        k = min(self.settings.stability_threshold, self.settings.max_denoising_steps)
        if k == 0:
            return True
        if self._history is None:
            self._history = torch.full((k, argmax_C.shape[0]), -1, dtype=argmax_C.dtype, device=argmax_C.device)
        stable = bool((self._history == argmax_C[None]).all())
        self._history = torch.roll(self._history, shifts=-1, dims=0)
        self._history[-1] = argmax_C
        return stable


def finalize_block(block_C: list[int], settings: SamplerSettings) -> tuple[list[int], bool]:
    """Pad everything after the first EOS (EOS kept); returns (tokens, hit_eos)."""
    eos = set(settings.eos_token_ids)
    for i, t in enumerate(block_C):
        if t in eos:
            if settings.pad_token_id is not None:
                block_C = block_C[: i + 1] + [settings.pad_token_id] * (len(block_C) - i - 1)
            return block_C, True
    return block_C, False
