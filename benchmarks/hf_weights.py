"""transformers' DiffusionGemmaForBlockDiffusion holding given weights (benchmarks only): built from a config folder
on the device, then every tensor copied in by its checkpoint name (the names are transformers' own state-dict
keys), so both sides of a comparison run the very same weights without a checkpoint on disk."""

from __future__ import annotations

from pathlib import Path

import torch

# Parameters the text model does not use (the vision tower and its projection keep their random init).
UNUSED = ("vision_tower", "embed_vision")


def hf_with_weights(folder: Path, named: dict[str, torch.Tensor], dtype: torch.dtype, device: str):
    from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype, attn_implementation="sdpa")
    state = model.state_dict()
    unknown = sorted(set(named) - set(state))
    if unknown:
        raise KeyError(f"transformers has no tensors named {unknown[:5]} ({len(unknown)} in all)")
    copied = list(named)
    with torch.no_grad():
        for name in copied:
            state[name].copy_(named.pop(name))  # each of ours is freed as soon as it is copied
    covered = {state[n].data_ptr() for n in copied}  # tied tensors (encoder and decoder layers) share storage
    missing = [k for k, t in state.items() if t.data_ptr() not in covered and not any(u in k for u in UNUSED)]
    if missing:
        raise KeyError(f"no weights given for transformers' {missing[:5]} ({len(missing)} in all)")
    return model.eval()
