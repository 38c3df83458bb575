"""Whether any engine unit can serve now: the gateway's health follows this, not a guess.

A unit can serve when all its rank actors (named `dgserve-<app>-<replica>-rank<i>`, units.py) answer a status
call within `timeout_s` and rank 0 says its engine is sound. The ranks are asked directly: their status call runs
on a thread of a threaded actor and answers in milliseconds under any load, where a probe request through Serve
would wait behind the very requests that keep a busy unit busy (and a busy unit is serving). A unit that is
starting (engine not up yet), has lost a rank, or has a hung rank does not count.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray

log = logging.getLogger("dgserve.gateway")


@dataclass(frozen=True)
class Verdict:
    serving: bool
    why: str  # the unit that can serve, or why none can
    all_to_all: tuple = ()  # the serving unit's start-up all-to-all sweep (rank 0's status), with expert ranks


def units_of(app: str, named: list[dict]) -> dict[str, dict[int, tuple[str, str]]]:
    """{unit: {rank: (namespace, actor name)}} of app `app`, from `ray.util.list_named_actors(all_namespaces=True)`."""
    out: dict[str, dict[int, tuple[str, str]]] = {}
    prefix = f"dgserve-{app}-"
    for entry in named:
        name = entry["name"]
        unit, sep, rank = name.rpartition("-rank")
        # the replica id has no '-': so "dgserve-a-b-<id>" is app "a-b", never app "a"
        if not sep or not rank.isdigit() or not unit.startswith(prefix) or "-" in unit[len(prefix):]:
            continue
        out.setdefault(unit, {})[int(rank)] = (entry["namespace"], name)
    return out


class UnitProbe:
    def __init__(self, app: str, ranks_per_unit: int, timeout_s: float = 2.0):
        self.app, self.ranks_per_unit, self.timeout_s = app, ranks_per_unit, timeout_s
        self._handles: dict[tuple[str, str], object] = {}

    async def check(self) -> Verdict:
        named = await asyncio.to_thread(ray.util.list_named_actors, True)
        units = units_of(self.app, named)
        self._handles = {k: h for k, h in self._handles.items() if any(k in u.values() for u in units.values())}
        whys = []
        for unit, ranks in sorted(units.items()):
            why, rank0 = await self._unit(ranks)
            if why is None:
                return Verdict(True, unit, tuple(rank0.get("all_to_all", ())))
            whys.append(f"{unit}: {why}")
        return Verdict(False, "; ".join(whys) or "no engine unit is up")

    async def _unit(self, ranks: dict[int, tuple[str, str]]) -> tuple[str | None, dict]:
        """(None when the unit can serve, else why not; rank 0's status)."""
        if sorted(ranks) != list(range(self.ranks_per_unit)):
            return f"ranks {sorted(ranks)} of {self.ranks_per_unit}", {}
        try:
            handles = [await self._handle(ranks[k]) for k in range(self.ranks_per_unit)]
            states = await asyncio.gather(*(asyncio.wait_for(h.status.remote(), self.timeout_s) for h in handles))
        except Exception as e:  # dead (ActorDiedError), gone (ValueError), silent (TimeoutError)
            return f"a rank does not answer ({type(e).__name__})", {}
        bad = [f"rank {s.get('rank')}: {s.get('failure') or 'not started'}" for s in states if not s.get("healthy")]
        return "; ".join(bad) or None, states[0]

    async def _handle(self, key: tuple[str, str]):
        if key not in self._handles:
            namespace, name = key
            self._handles[key] = await asyncio.to_thread(ray.get_actor, name, namespace)
        return self._handles[key]
