"""When the executor's passes run through the decoder step graphs (model/step_graphs.py), and how a pass that
mixes encoder items and canvases is split between the plain forward and the graphs."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from dgserve.model.step_graphs import BUCKETS, DecoderGraphs
from dgserve.model.transformer import DiffusionGemma, WorkItem

from .config import EngineConfig

log = logging.getLogger("dgserve.engine")


def step_graphs(model: DiffusionGemma, config: EngineConfig) -> DecoderGraphs | None:
    """The captured step graphs for this engine: on CUDA, with `cuda_graphs` on and every expert local; counts up
    to the first bucket that holds max_running canvases. None otherwise."""
    capable = getattr(model.experts, "graph_capable", None)
    if not (config.cuda_graphs and model.device.type == "cuda" and capable is not None and capable(model.device)):
        return None
    top = next((b for b in BUCKETS if b >= config.max_running), BUCKETS[-1])
    try:
        return DecoderGraphs(model, tuple(b for b in BUCKETS if b <= top))
    except Exception as e:  # an op that a graph cannot hold: serve without graphs, and say so
        log.warning("CUDA graph capture failed (%s: %s); the decoder step runs without graphs", type(e).__name__, e)
        gc.collect()  # the half-captured graphs and their pool, before the memory budget is read
        torch.cuda.empty_cache()
        return None


def run_pass(model: DiffusionGemma, graphs: DecoderGraphs | None, work: list[WorkItem],
             on_layer: Callable[[int], None]) -> torch.Tensor:
    """Final-normed hidden rows [N, D] of a pass, in item order. Its canvases go through the graphs when there
    are any and they fit; its encoder items (commits, prompt chunks) first, in a plain forward, so a request's
    commit writes its keys before its canvas reads them."""
    canvases = [i for i, w in enumerate(work) if not w.encode]
    if graphs is None or not canvases or len(canvases) > graphs.max_canvases:
        return model.forward(work, on_layer)
    if len(canvases) == len(work):
        return graphs.run(work, on_layer)
    encoders = [i for i, w in enumerate(work) if w.encode]
    parts = {"enc": model.forward([work[i] for i in encoders], on_layer),
             "canvas": graphs.run([work[i] for i in canvases], on_layer)}
    starts, row = [], 0
    for w in work:
        starts.append(row)
        row += w.ids.shape[0]
    out = parts["canvas"].new_empty(row, parts["canvas"].shape[1])
    for name, index in (("enc", encoders), ("canvas", canvases)):
        src = 0
        for i in index:
            n = work[i].ids.shape[0]
            out[starts[i]:starts[i] + n] = parts[name][src:src + n]
            src += n
    return out
