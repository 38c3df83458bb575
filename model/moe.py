"""Router and routed experts behind one narrow interface.

`ExpertBackend.__call__(layer, rows [T, D], expert_ids [T, K], weights [T, K], layout) -> combined rows [T, D]` is
the only way the layer stack reaches its experts, so experts can later live in other processes (expert ranks
exchanging rows by all-to-all) without touching attention code. `layout` (optional) says which rows belong to
which work item, so a batch gives every item exactly the expert outputs it would get alone (see RowLayout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dgserve.kernels.fp8 import fp8_linear, quantize, scaled_grouped_mm
from dgserve.kernels.moe import grouped_mm, grouped_mm_backend

from .layers import RowLayout, linear, rms_norm


def route(x_TD: torch.Tensor, proj_ED: torch.Tensor, scale_D: torch.Tensor, per_expert_scale_E: torch.Tensor,
          top_k: int, eps: float, layout: RowLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router on the raw residual: weights [T, K] (float32) and expert ids [T, K] (MODEL_SPEC 3.5)."""
    h = rms_norm(x_TD, None, eps) * scale_D * (x_TD.shape[-1] ** -0.5)
    probs_TE = torch.softmax(linear(h, proj_ED, layout), dim=-1, dtype=torch.float32)
    w_TK, ids_TK = torch.topk(probs_TE, k=top_k, dim=-1)
    w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return w_TK * per_expert_scale_E[ids_TK], ids_TK


class ExpertBackend(Protocol):
    def __call__(self, layer: int, rows_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor: ...


@dataclass
class ExpertWeights:
    gate_up: torch.Tensor  # [E_local, 2I, D] rows 0..I-1 gate, I..2I-1 up
    down: torch.Tensor  # [E_local, D, I]
    # FP8 experts (kernels/fp8): gate_up and down in float8_e4m3fn, with float32 scales per output channel
    gate_up_scale: torch.Tensor | None = None  # [E_local, 2I]
    down_scale: torch.Tensor | None = None  # [E_local, D]

    @property
    def fp8(self) -> bool:
        return self.gate_up_scale is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down, self.gate_up_scale,
                                                          self.down_scale) if t is not None)

    @classmethod
    def quantized(cls, gate_up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
        """FP8 experts from full-precision ones (per output channel)."""
        (gu, gu_s), (dn, dn_s) = quantize(gate_up), quantize(down)
        return cls(gu, dn, gu_s, dn_s)


def _project(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
    """One expert's projection: a GEMM, or for FP8 experts activations quantized per token times the FP8 weight."""
    return F.linear(x, w[e]) if scale is None else fp8_linear(x, w[e], scale[e])


def expert_ffn(x_PD: torch.Tensor, counts: list[int], w: ExpertWeights, first_expert: int = 0) -> torch.Tensor:
    """Rows sorted by expert, `counts[e]` rows for local expert e -> expert outputs [P, D] (unweighted)."""
    out = torch.empty_like(x_PD)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        x, i = x_PD[start:start + n], first_expert + e
        gate, up = _project(x, w.gate_up, w.gate_up_scale, i).chunk(2, dim=-1)
        out[start:start + n] = _project(F.gelu(gate, approximate="tanh") * up, w.down, w.down_scale, i)
        start += n
    return out


def grouped_ffn(x_PD: torch.Tensor, offs_E: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """Rows sorted by local expert, `offs_E[e]` the end of expert e's rows (int32, on x's device) -> expert outputs
    [P, D] (unweighted) in one grouped GEMM per projection (`kernels.moe.grouped_mm`); rows past `offs_E[-1]`
    (padding) are left unset.

    The offsets are never read back to the host, so the call keeps a CUDA graph possible (torch._grouped_mm on CPU
    and for bfloat16 on sm90, the Triton kernel on other GPUs and dtypes); on CPU it is bitwise a GEMM per expert."""
    if w.fp8:  # kernels/fp8: torch._scaled_grouped_mm on sm90, FP8 values in a grouped GEMM elsewhere
        gate, up = scaled_grouped_mm(x_PD, w.gate_up, w.gate_up_scale, offs_E).chunk(2, dim=-1)
        return scaled_grouped_mm(F.gelu(gate, approximate="tanh") * up, w.down, w.down_scale, offs_E)
    gate, up = grouped_mm(x_PD, w.gate_up, offs_E).chunk(2, dim=-1)
    return grouped_mm(F.gelu(gate, approximate="tanh") * up, w.down, offs_E)


def expert_counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Rows per expert [n] (int64) on the ids' device, without a read back: `torch.bincount` sizes its output from
    the largest id, which on CUDA is a host synchronisation; a scatter-add into n slots is not."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def group_rows(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the permutation that groups rows by id, a stable sort [P]; each group's end in the sorted rows, int32 [n])
    for ids in 0..n-1, all on the ids' device, nothing read back: the offsets `grouped_ffn` takes."""
    order = torch.sort(ids, stable=True).indices
    return order, torch.cumsum(expert_counts(ids, n), 0, dtype=torch.int32)


def combine_experts(y_PD: torch.Tensor, weights_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Expert outputs [T*K, D] -> each token's weighted sum over its K experts [T, D] in `dtype`: independent of
    the other rows in the batch (T may be 0: an idle rank)."""
    T, K = weights_TK.shape
    weighted = y_PD * weights_TK.reshape(-1).unsqueeze(-1)
    return weighted.view(T, K, y_PD.shape[-1]).sum(dim=1).to(dtype)


def counts_ffn(x_PD: torch.Tensor, counts: list[int], w: ExpertWeights) -> torch.Tensor:
    """`expert_ffn` for rows sorted by expert with host-side `counts`: one grouped GEMM per projection in float32 on
    CPU (bitwise the same as a GEMM per expert there), a GEMM per expert otherwise."""
    if x_PD.device.type == "cpu" and x_PD.dtype == torch.float32:
        return grouped_ffn(x_PD, torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32), w)
    return expert_ffn(x_PD, counts, w)


class LocalExperts:
    """All experts of every layer in this process (the `replicated` profile, and the reference path)."""

    def __init__(self, layers: list[ExpertWeights], expert_ids: tuple[int, ...] | None = None,
                 num_experts: int | None = None, graph_safe: bool | None = None):
        """`graph_safe`: every layer in one grouped GEMM per projection with the group offsets on the device and
        nothing read back to the host (the GPU path, which a CUDA graph can hold); None: on every device but the
        CPU, where the exact path (bitwise the reference, batch-invariant by RowLayout) runs instead."""
        self.layers, self.graph_safe = layers, graph_safe
        held = layers[0].gate_up.shape[0] if layers else 0
        self.expert_ids = tuple(range(held)) if expert_ids is None else tuple(expert_ids)
        self.num_experts = num_experts if num_experts is not None else held
        # global expert id -> local row; -1 for experts another process holds
        self._local = torch.full((self.num_experts,), -1, dtype=torch.long)
        self._local[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        self._all_local = len(self.expert_ids) == self.num_experts

    def graph_capable(self, device: torch.device) -> bool:
        """Whether a CUDA graph can hold these experts on `device`: all held here, on the graph-safe path, with a
        grouped GEMM that keeps its offsets on the device (not the per-expert loop)."""
        safe = self.graph_safe if self.graph_safe is not None else device.type != "cpu"
        if not (self._all_local and safe and self.layers):
            return False
        return grouped_mm_backend(device, self.layers[0].gate_up.dtype) != "loop"

    def __call__(self, layer: int, rows_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        T, K = expert_ids_TK.shape
        flat_ids = expert_ids_TK.reshape(-1)  # [P], P = T*K
        if not self._all_local:
            flat_ids = self._local.to(flat_ids.device)[flat_ids]
            if bool((flat_ids < 0).any()):
                missing = sorted(set(expert_ids_TK.reshape(-1)[flat_ids < 0].tolist()))
                raise RuntimeError(f"layer {layer}: experts {missing} are not held by this process")
        w = self.layers[layer]
        if self.graph_safe if self.graph_safe is not None else rows_TD.device.type != "cpu":
            return combine_experts(self._run_graph_safe(rows_TD, K, flat_ids, w), weights_TK, rows_TD.dtype)
        groups = self._small_groups(flat_ids, K, layout)
        y_PD = torch.empty(T * K, rows_TD.shape[-1], dtype=rows_TD.dtype, device=rows_TD.device)
        if groups is None:
            self._run(rows_TD, K, flat_ids, torch.arange(T * K, device=flat_ids.device), w, y_PD)
        else:
            big = (~groups).nonzero().squeeze(-1)
            if big.numel():
                self._run(rows_TD, K, flat_ids[big], big, w, y_PD)
            self._run_small(rows_TD, K, flat_ids, groups, layout, w, y_PD)
        return combine_experts(y_PD, weights_TK, rows_TD.dtype)

    def _run_graph_safe(self, rows_TD: torch.Tensor, K: int, flat_ids: torch.Tensor,
                        w: ExpertWeights) -> torch.Tensor:
        """Expert outputs [T*K, D] (unweighted): rows permuted by expert (a stable sort on the device), one grouped
        GEMM per projection over offsets that stay on the device, outputs un-permuted by a scatter."""
        y_PD = rows_TD.new_empty(flat_ids.shape[0], rows_TD.shape[-1])
        if flat_ids.shape[0] == 0:
            return y_PD
        order, offs = group_rows(flat_ids, len(self.expert_ids))
        y_PD[order] = grouped_ffn(rows_TD[order // K], offs, w)
        return y_PD

    def _run(self, rows_TD: torch.Tensor, K: int, ids_P: torch.Tensor, flat_P: torch.Tensor, w: ExpertWeights,
             out_PD: torch.Tensor) -> None:
        """Expert outputs (unweighted) for assignments `flat_P` (indices into T*K) with local expert ids `ids_P`."""
        # The reference's own (unstable) sort: with several threads a small GEMM's row depends on its place in
        # the group, so rows must be ordered as the reference orders them.
        ids_sorted, perm = torch.sort(ids_P)
        counts = torch.bincount(ids_sorted, minlength=len(self.expert_ids)).tolist()
        src = flat_P[perm]
        out_PD[src] = counts_ffn(rows_TD[src // K], counts, w)

    def _small_groups(self, flat_ids: torch.Tensor, K: int,
                      layout: RowLayout | None) -> torch.Tensor | None:
        """A mask [P] of the assignments whose (item, expert) group is under layout.min_rows rows; None when there
        is no such group."""
        if layout is None or not layout.exact or len(layout.bounds) <= 2 or flat_ids.device.type != "cpu":
            return None
        key = self._group_keys(flat_ids, K, layout)
        counts = torch.bincount(key)
        small_key = (counts > 0) & (counts < layout.min_rows)
        if not bool(small_key.any()):
            return None
        return small_key[key]

    def _group_keys(self, flat_ids: torch.Tensor, K: int, layout: RowLayout) -> torch.Tensor:
        bounds = torch.tensor(layout.bounds[1:-1], device=flat_ids.device)
        token_P = torch.arange(flat_ids.shape[0], device=flat_ids.device) // K
        item_P = torch.bucketize(token_P, bounds, right=True)
        return item_P * len(self.expert_ids) + flat_ids

    def _run_small(self, rows_TD: torch.Tensor, K: int, flat_ids: torch.Tensor, small_P: torch.Tensor,
                   layout: RowLayout, w: ExpertWeights, out_PD: torch.Tensor) -> None:
        """Each small (item, expert) group in a GEMM of its own, its rows in the order the item's own sort puts them
        when it runs alone (with several threads a small GEMM's row depends on its place in the group)."""
        for a, b in zip(layout.bounds, layout.bounds[1:], strict=False):
            span = slice(a * K, b * K)
            if not bool(small_P[span].any()):
                continue
            ids_sorted, perm = torch.sort(flat_ids[span])  # the very call `_run` makes for this item alone
            perm = perm + a * K
            keep = small_P[perm]
            src, ids_sorted = perm[keep], ids_sorted[keep]
            experts, counts = torch.unique_consecutive(ids_sorted, return_counts=True)
            start = 0
            for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
                rows = src[start:start + n]
                out_PD[rows] = expert_ffn(rows_TD[rows // K], [n], w, first_expert=e)
                start += n
