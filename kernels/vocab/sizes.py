"""Workspace sizes of the fused vocabulary pass, without importing Triton (a CPU machine may not have it)."""

from __future__ import annotations

SPLITS = 4  # the Triton kernel's vocabulary splits (programs per row block)
STATS = 7  # per split and row: max, sum, sum of e*z, best, its index, best noisy, its index
REFERENCE_CHUNK = 2048  # vocabulary rows per chunk of the torch path


def triton_workspace_bytes(rows: int, hidden: int, soft: bool = True, splits: int = SPLITS) -> int:
    """float32/int32 statistics and float32 soft parts per split and row, and the merged float32 soft output."""
    return splits * rows * STATS * 4 + ((splits + 1) * rows * hidden * 4 if soft else 0)


def reference_workspace_bytes(rows: int, hidden: int, vocab: int, soft: bool = True,
                              chunk: int = REFERENCE_CHUNK) -> int:
    """A chunk's logits and its temporaries (about four [rows, chunk] float32 tensors) and the soft accumulator."""
    return rows * (4 * min(chunk, vocab) * 4 + (hidden * 4 if soft else 0))
