"""Which expert rank holds which routed expert: the same map on every layer, balanced by default.

A unit's process group is A attention ranks (group ranks 0..A-1) followed by E expert ranks (A..A+E-1); expert
rank j (0-based among the expert ranks) holds `experts_of(j)`. An explicit map (the topology's
`expert_map`: expert rank -> expert ids) must name every expert exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dgserve.model.errors import ConfigError


@dataclass(frozen=True)
class ExpertPartition:
    num_experts: int
    owners: tuple[int, ...]  # expert id -> expert rank (0..ranks-1)
    ranks: int

    @classmethod
    def balanced(cls, num_experts: int, ranks: int) -> ExpertPartition:
        """Contiguous blocks whose sizes differ by at most one (the first `num_experts % ranks` get one more)."""
        if not 1 <= ranks <= num_experts:
            raise ConfigError("expert_ranks", ranks, f"1..{num_experts} (the model has {num_experts} experts)")
        base, extra = divmod(num_experts, ranks)
        owners = [j for j in range(ranks) for _ in range(base + (j < extra))]
        return cls(num_experts, tuple(owners), ranks)

    @classmethod
    def explicit(cls, num_experts: int, mapping: Mapping[int, Sequence[int]]) -> ExpertPartition:
        """From {expert rank: [expert ids]}: ranks 0..E-1, each holding at least one expert, every expert once."""
        ranks = len(mapping)
        if sorted(mapping) != list(range(ranks)) or ranks == 0:
            raise ConfigError("expert_map", sorted(mapping), "expert ranks 0..E-1, each a key")
        owners = [-1] * num_experts
        for j, ids in mapping.items():
            if not ids:
                raise ConfigError(f"expert_map.{j}", list(ids), "at least one expert id")
            for e in ids:
                if not (isinstance(e, int) and 0 <= e < num_experts):
                    raise ConfigError(f"expert_map.{j}", e, f"expert ids in 0..{num_experts - 1}")
                if owners[e] != -1:
                    raise ConfigError(f"expert_map.{j}", e, f"each expert once (expert {e} is on rank {owners[e]})")
                owners[e] = j
        missing = [e for e, j in enumerate(owners) if j == -1]
        if missing:
            raise ConfigError("expert_map", missing, "every expert on some rank (these are on none)")
        return cls(num_experts, tuple(owners), ranks)

    def experts_of(self, rank: int) -> tuple[int, ...]:
        """The expert ids rank `rank` holds, ascending (its local expert i is the i-th of them)."""
        return tuple(e for e, j in enumerate(self.owners) if j == rank)

    def local_index(self) -> tuple[int, ...]:
        """expert id -> its row in its owner's local weights."""
        seen = [0] * self.ranks
        out = []
        for j in self.owners:
            out.append(seen[j])
            seen[j] += 1
        return tuple(out)
