"""Dispatch and combine: the attention ranks' ExpertBackend and the expert ranks' side of the same exchange.

Per MoE layer, every rank of the unit's group (A attention ranks, then E expert ranks) takes part in the same
collectives, in the same order:

1. counts: `all_to_all_single` of one int64 per peer (how many rows this rank sends each peer);
2. rows [N, D] and their metadata [N, 2] (the expert's row in its owner's weights, and a group tag): two
   `all_to_all_single` with those split sizes (the list form fails on gloo with uneven sizes);
3. the expert ranks run what they received and send the outputs back along the reverse splits.

Attention ranks send rows only to expert ranks and receive none; expert ranks send nothing in the dispatch; an
attention rank with no rows (idle, or an empty batch) still joins every collective with zero rows.

Fixed capacity (`capacity` rows > 0 for the pass, agreed through the step plan): step 1 is skipped and every split
size is a function of the capacity alone. An attention rank sends expert rank j `capacity * min(K, n_j)` row slots
(n_j: the experts j holds; no token sends more rows there), real rows first and padding (expert -1) after; the
expert rank sorts by expert on the device and runs one grouped GEMM per projection with device offsets. Nothing
is read back to the host inside the pass, so the shapes are fixed and a CUDA graph can hold the layer; the price
is the padding's bytes. This mode cannot single out small (item, expert) groups: it is bitwise only for groups of
at least `RowLayout.min_rows` rows (float32 on CPU) and meant for the GPU, where the variable mode's rule is off.

Exactness (float32 on CPU): a row in an (item, expert) group of at least `RowLayout.min_rows` rows gets the same
bits in any GEMM; a smaller group is tagged, sent contiguous in the order the item alone would sort it, and run
by the expert rank in a GEMM of its own, as `LocalExperts` does co-located. So the split never changes a result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dgserve.model.layers import RowLayout
from dgserve.model.moe import (
    ExpertWeights,
    combine_experts,
    counts_ffn,
    expert_counts,
    expert_ffn,
    group_rows,
    grouped_ffn,
)

from .partition import ExpertPartition

BIG = -1  # the tag of a row whose group is row-invariant (any GEMM gives it the same bits)


@dataclass(frozen=True)
class Roles:
    """Group ranks: attention ranks 0..A-1, then expert ranks A..A+E-1."""

    attention: int
    experts: int

    @property
    def world(self) -> int:
        return self.attention + self.experts

    def expert_group_rank(self, j: int) -> int:
        return self.attention + j


def send_order(flat_ids: torch.Tensor, K: int, layout: RowLayout | None,
               num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment indices in send order [P], group tags [P]): row-invariant assignments first (tag BIG), then
    each small (item, expert) group contiguous, in the order the item's own sort puts it (tag: its group key).
    Without a layout the rows are one item: co-located, its small groups run in GEMMs of their own size, which
    rows of other attention ranks must not join on the expert rank."""
    P = flat_ids.shape[0]
    everything = torch.arange(P, device=flat_ids.device)
    if layout is None:  # one item: its small expert groups must not merge with other ranks' rows either
        layout = RowLayout((0, P // K))
    if not layout.exact or flat_ids.device.type != "cpu":
        return everything, torch.full((P,), BIG, dtype=torch.long, device=flat_ids.device)
    bounds = torch.tensor(layout.bounds[1:-1], device=flat_ids.device)
    item = torch.bucketize(everything // K, bounds, right=True)
    key = item * num_experts + flat_ids
    counts = torch.bincount(key)
    small = ((counts > 0) & (counts < layout.min_rows))[key]
    order, tags = [everything[~small]], [torch.full((int((~small).sum()),), BIG, dtype=torch.long)]
    for a, b in zip(layout.bounds, layout.bounds[1:], strict=False):
        span = slice(a * K, b * K)
        if not bool(small[span].any()):
            continue
        _, perm = torch.sort(flat_ids[span])  # the very call LocalExperts makes for this item alone
        perm = perm + a * K
        src = perm[small[perm]]
        order.append(src)
        tags.append(key[src])
    return torch.cat(order), torch.cat(tags)


def fixed_slots(capacity: int, top_k: int, held: int) -> int:
    """Row slots an attention rank sends an expert rank holding `held` experts in a fixed-capacity pass of at most
    `capacity` rows per attention rank: each row sends at most min(K, held) of its K assignments there."""
    return capacity * min(top_k, held)


def exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    """send[i]: rows this rank sends group rank i -> recv[i]: rows group rank i sends this rank (int64 [world])."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows of `x` split by `send` go out; rows split by `recv` come in (x's trailing shape and dtype)."""
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class AllToAllExperts:
    """An attention rank's ExpertBackend: its rows go to the expert ranks that hold their experts and come back."""

    def __init__(self, partition: ExpertPartition, roles: Roles, group=None):
        self.partition, self.roles, self.group = partition, roles, group
        self._owner = torch.tensor([roles.expert_group_rank(j) for j in partition.owners], dtype=torch.long)
        self._local = torch.tensor(partition.local_index(), dtype=torch.long)
        self.held = [len(partition.experts_of(j)) for j in range(roles.experts)]
        self.capacity = 0  # rows per attention rank of a fixed-capacity pass; 0: variable splits
        self._starts: dict[tuple[int, str], torch.Tensor] = {}
        self._exchange_s = 0.0  # since the last take_stats: seconds in the collectives
        self._rows: dict[int, list[int]] = {}  # layer -> rows sent to each expert rank
        self._fixed_rows: dict[int, torch.Tensor] = {}  # the same for fixed passes, kept on the device until read

    def maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(group rank holding each expert [E], the expert's row in its holder's weights [E]) on `device` (copied
        there once)."""
        if self._owner.device != device:
            self._owner, self._local = self._owner.to(device), self._local.to(device)
        return self._owner, self._local

    def _slot_starts(self, K: int, device: torch.device) -> torch.Tensor:
        """Each expert rank's first slot per row of capacity: exclusive sums of min(K, experts held) [E], made on
        `device` once per K (no host-to-device copy inside a pass)."""
        key = (K, str(device))
        if key not in self._starts:
            per = [min(K, n) for n in self.held]
            self._starts[key] = torch.tensor([sum(per[:j]) for j in range(len(per))], device=device)
        return self._starts[key]

    def set_capacity(self, rows: int) -> None:
        """The exchange of the coming passes: fixed capacity of `rows` rows per attention rank, or (0) variable."""
        self.capacity = rows

    def take_stats(self) -> tuple[float, tuple[tuple[int, ...], ...]]:
        """(seconds spent exchanging, rows sent to each expert rank per layer) since the last call. Reads the fixed
        passes' counts back here, after the pass."""
        for layer, n in self._fixed_rows.items():
            rows = self._rows.setdefault(layer, [0] * self.roles.experts)
            for j, k in enumerate(n.tolist()):
                rows[j] += k
        rows = tuple(tuple(self._rows[layer]) for layer in sorted(self._rows))
        out, self._exchange_s, self._rows, self._fixed_rows = (self._exchange_s, rows), 0.0, {}, {}
        return out

    def __call__(self, layer: int, rows_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        if self.capacity:
            return self._fixed(layer, rows_TD, expert_ids_TK, weights_TK)
        T, K = expert_ids_TK.shape
        D = rows_TD.shape[-1]
        flat = expert_ids_TK.reshape(-1)
        order, tags = send_order(flat, K, layout, self.partition.num_experts)
        owner, local = self.maps(flat.device)
        dest = owner[flat[order]]
        by_dest = torch.sort(dest, stable=True).indices  # each group stays contiguous and in its order
        sent, tags = order[by_dest], tags[by_dest]
        send = torch.bincount(dest, minlength=self.roles.world)
        t0 = time.perf_counter()
        recv = exchange_counts(send, self.group).tolist()
        send = send.tolist()
        exchange(rows_TD[sent // K], send, recv, self.group)
        exchange(torch.stack([local[flat[sent]], tags], dim=-1), send, recv, self.group)
        back = exchange(rows_TD.new_empty(0, D), recv, send, self.group)  # expert outputs
        self._exchange_s += time.perf_counter() - t0  # with the expert ranks' compute: they answer inside it
        rows = self._rows.setdefault(layer, [0] * self.roles.experts)
        for j, n in enumerate(send[self.roles.attention:]):
            rows[j] += n
        y_PD = rows_TD.new_empty(T * K, D)
        y_PD[sent] = back
        return combine_experts(y_PD, weights_TK, rows_TD.dtype)

    def _fixed(self, layer: int, rows_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
               weights_TK: torch.Tensor) -> torch.Tensor:
        """A fixed-capacity exchange: split sizes from the capacity alone; nothing read back inside the pass."""
        T, K = expert_ids_TK.shape
        D, dev = rows_TD.shape[-1], rows_TD.device
        if self.capacity < T:  # shapes only: both are known on the host before the pass
            raise RuntimeError(f"layer {layer}: {T} rows exceed the pass's exchange capacity of {self.capacity} rows")
        slots = [fixed_slots(self.capacity, K, n) for n in self.held]
        flat = expert_ids_TK.reshape(-1)
        owner, local = self.maps(dev)
        dest = owner[flat] - self.roles.attention  # expert rank of each assignment [P]
        order = torch.sort(dest, stable=True).indices
        counts = expert_counts(dest, self.roles.experts)  # on the device; read only by take_stats
        first = torch.cumsum(counts, 0) - counts
        start = self._slot_starts(K, dev) * self.capacity  # where each expert rank's slots begin
        d = dest[order]
        slot = start[d] + torch.arange(order.shape[0], device=dev) - first[d]  # each assignment's place [P]
        x = rows_TD.new_zeros(sum(slots), D)
        x[slot] = rows_TD[order // K]
        meta = torch.full((sum(slots),), -1, dtype=torch.long, device=dev)  # the expert's row, -1: padding
        meta[slot] = local[flat[order]]
        send, none = [0] * self.roles.attention + slots, [0] * self.roles.world
        t0 = time.perf_counter()
        exchange(x, send, none, self.group)
        exchange(meta, send, none, self.group)
        back = exchange(rows_TD.new_empty(0, D), none, send, self.group)
        self._exchange_s += time.perf_counter() - t0
        self._fixed_rows[layer] = self._fixed_rows.get(layer, 0) + counts
        y_PD = rows_TD.new_empty(T * K, D)
        y_PD[order] = back[slot]
        return combine_experts(y_PD, weights_TK, rows_TD.dtype)


class ExpertServer:
    """An expert rank's side of every layer's exchange: it holds only its experts' weights."""

    def __init__(self, layers: list[ExpertWeights], roles: Roles, group=None, top_k: int | None = None):
        """`top_k`: the router's K (needed by fixed-capacity passes)."""
        self.layers, self.roles, self.group, self.top_k = layers, roles, group, top_k
        self.experts = layers[0].gate_up.shape[0] if layers else 0
        self.device = layers[0].gate_up.device if layers else torch.device("cpu")

    def serve_layer(self, layer: int, D: int, dtype: torch.dtype, capacity: int = 0) -> int:
        """Join one layer's exchange: receive rows, run them, send the outputs back. Returns the row slots received
        (`capacity` > 0: a fixed-capacity pass)."""
        if capacity:
            return self._serve_fixed(layer, D, dtype, capacity)
        none = [0] * self.roles.world
        zeros = torch.zeros(self.roles.world, dtype=torch.long, device=self.device)
        recv = exchange_counts(zeros, self.group).tolist()
        x = exchange(torch.empty(0, D, dtype=dtype, device=self.device), none, recv, self.group)
        meta = exchange(torch.empty(0, 2, dtype=torch.long, device=self.device), none, recv, self.group)
        y = self.run(layer, x, meta, recv)
        exchange(y, recv, none, self.group)
        return x.shape[0]

    def _serve_fixed(self, layer: int, D: int, dtype: torch.dtype, capacity: int) -> int:
        """A fixed-capacity pass: every attention rank's slots, sorted by expert on the device (padding last), one
        grouped GEMM per projection with device offsets; nothing read back to the host."""
        if self.top_k is None:
            raise RuntimeError("a fixed-capacity exchange needs the expert server's top_k")
        slots = fixed_slots(capacity, self.top_k, self.experts)
        recv, none = [slots] * self.roles.attention + [0] * self.roles.experts, [0] * self.roles.world
        x = exchange(torch.empty(0, D, dtype=dtype, device=self.device), none, recv, self.group)
        meta = exchange(torch.empty(0, dtype=torch.long, device=self.device), none, recv, self.group)
        key = torch.where(meta < 0, self.experts, meta)  # padding: a group of its own after every expert's
        perm, offs = group_rows(key, self.experts + 1)
        y = torch.empty_like(x)
        y[perm] = grouped_ffn(x[perm], offs[:self.experts], self.layers[layer])
        exchange(y, recv, none, self.group)
        return x.shape[0]

    def run(self, layer: int, x_ND: torch.Tensor, meta_N2: torch.Tensor, recv: list[int]) -> torch.Tensor:
        """Expert outputs (unweighted) in the order received: row-invariant rows grouped by expert in one grouped
        GEMM; each small group in a GEMM of its own, in the order it came (as LocalExperts runs them)."""
        w, out = self.layers[layer], torch.empty_like(x_ND)
        local, tags = meta_N2[:, 0], meta_N2[:, 1]
        big = (tags == BIG).nonzero().squeeze(-1)
        if big.numel():
            ids_sorted, perm = torch.sort(local[big])
            counts = torch.bincount(ids_sorted, minlength=self.experts).tolist()
            src = big[perm]
            out[src] = counts_ffn(x_ND[src], counts, w)
        small = (tags != BIG).nonzero().squeeze(-1)
        if small.numel():
            sender = torch.repeat_interleave(torch.arange(len(recv), device=x_ND.device),
                                             torch.tensor(recv, device=x_ND.device))[small]
            group_key = sender * (int(tags.max()) + 1) + tags[small]
            _, sizes = torch.unique_consecutive(group_key, return_counts=True)
            start = 0
            for n in sizes.tolist():
                rows = small[start:start + n]
                out[rows] = expert_ffn(x_ND[rows], [n], w, first_expert=int(local[rows[0]]))
                start += n
        return out
