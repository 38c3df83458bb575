"""Engine test helpers: varied requests and engines on the tiny model (fixtures in tests/cluster/conftest.py)."""

from __future__ import annotations

import random

from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
from dgserve.cluster.engine.budget import PREFIX
from dgserve.model.sampler import SamplerSettings


def settings(ck, **kw) -> SamplerSettings:
    return SamplerSettings.from_defaults(ck.generation, **kw)


def varied_requests(ck, n: int, seed: int = 0, max_len: int = 90) -> list[EngineRequest]:
    """n requests with different prompt lengths (1..max_len), seeds and sampler knobs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randint(4, 900) for _ in range(rng.randint(1, max_len))]
        s = settings(ck, max_new_tokens=rng.choice([32, 64, 96]), max_denoising_steps=rng.choice([8, 16, 48]),
                     t_max=rng.choice([0.8, 1.0]), entropy_bound=rng.choice([0.1, 0.5]))
        out.append(EngineRequest(ids, s, seed=1000 * seed + 7 * i, request_id=f"r{i}"))
    return out


def make_engine(ck, **cfg) -> Engine:
    return Engine(ck.model, EngineConfig(**cfg))


def held_by_requests(engine: Engine) -> int:
    """Budget bytes reserved by requests (cached prefixes, which stay after requests end, left out)."""
    return engine.budget.used - engine.budget.held(PREFIX)
