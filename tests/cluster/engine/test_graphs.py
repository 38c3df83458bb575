"""The executor's passes through the decoder step graphs (run eagerly on CPU): a pass that mixes commits and
canvases gives every row what a plain pass gives it; an engine serves through them; and they are used only where a
graph can hold the step."""

from __future__ import annotations

import copy

import pytest
import torch

from dgserve.cluster.engine import Engine, EngineConfig, EngineRequest
from dgserve.cluster.engine.executor import Executor
from dgserve.cluster.engine.graphs import run_pass, step_graphs
from dgserve.model.loader import load_checkpoint
from dgserve.model.moe import LocalExperts
from dgserve.model.step_graphs import DecoderGraphs
from dgserve.model.transformer import WorkItem

from .conftest import settings


@pytest.fixture(scope="module")
def gpu_path(tiny_dir):
    """The tiny model as the GPU runs it: graph-safe experts, batched attention."""
    ck = load_checkpoint(tiny_dir)
    ck.model.experts = LocalExperts(ck.model.experts.layers, graph_safe=True)
    ck.model.batched_attention = True
    return ck


def test_a_mixed_pass_runs_its_commits_then_its_canvases_through_the_graphs(gpu_path):
    m = gpu_path.model
    C = m.config.canvas_length
    caches = [m.new_cache() for _ in range(3)]
    for i, c in enumerate(caches):
        m.forward([WorkItem(c, torch.arange(3, 10 + 9 * i), encode=True)])
    work = [WorkItem(caches[0], torch.arange(40, 40 + C), encode=True),  # request 0 commits, then denoises
            WorkItem(caches[0], torch.arange(50, 50 + C), encode=False),
            WorkItem(caches[1], torch.arange(60, 60 + C), encode=False),
            WorkItem(caches[2], torch.arange(5, 12), encode=True)]  # a prompt chunk after the canvases
    plain_caches = copy.deepcopy(caches)
    index = {id(c): i for i, c in enumerate(caches)}
    plain_work = [WorkItem(plain_caches[index[id(w.cache)]], w.ids, w.encode) for w in work]
    want = m.forward(plain_work)
    beats = []
    got = run_pass(m, DecoderGraphs(m, buckets=(2,), capture=False), work, beats.append)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [c.length for c in caches] == [c.length for c in plain_caches]
    assert len(beats) == 2 * m.cfg.num_layers  # the plain forward and the graphs both beat per layer


def test_an_engine_serves_through_the_graphs(gpu_path, monkeypatch):
    m = gpu_path.model
    graphs = DecoderGraphs(m, buckets=(1, 2, 4), capture=False)
    used = []
    real_run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda items, beat=None: used.append(len(items)) or real_run(items, beat))
    config = EngineConfig(max_running=3, sampler="exact")
    engine = Engine(m, config, executor=Executor(m, m.config.canvas_length, graphs=graphs))
    C = m.config.canvas_length
    streams = [engine.submit(EngineRequest(list(range(5, 15 + 3 * i)), settings(
        gpu_path, max_new_tokens=(i + 1) * C, max_denoising_steps=4, eos_token_ids=()), seed=i)) for i in range(3)]
    while not engine.idle:
        engine.step()
    engine.stop()
    results = [st.result(0) for st in streams]
    assert [len(r.token_ids) for r in results] == [C, 2 * C, 3 * C]
    assert {1, 2, 3} <= set(used)  # 3 canvases padded to 4, then 2, then 1


def test_graphs_only_where_a_graph_can_hold_the_step(gpu_path, tiny_dir):
    assert step_graphs(gpu_path.model, EngineConfig()) is None  # CPU: no capture, the plain forward
    exact = load_checkpoint(tiny_dir).model
    partial = LocalExperts(exact.experts.layers, expert_ids=(0, 1), num_experts=8, graph_safe=True)
    assert not partial.graph_capable(torch.device("cuda"))  # others' experts: an exchange sized on the host
    assert LocalExperts(exact.experts.layers).graph_capable(torch.device("cuda"))
    assert not LocalExperts(exact.experts.layers).graph_capable(torch.device("cpu"))
    with pytest.raises(Exception, match="cuda_graphs"):
        EngineConfig(cuda_graphs="yes")


def test_a_failed_capture_serves_without_graphs_and_says_so(monkeypatch, caplog):
    from types import SimpleNamespace

    from dgserve.cluster.engine import graphs as graphs_module

    def no_capture(model, buckets):
        raise RuntimeError(f"operation not permitted when stream is capturing ({buckets})")

    monkeypatch.setattr(graphs_module, "DecoderGraphs", no_capture)
    fake = SimpleNamespace(device=torch.device("cuda"), experts=SimpleNamespace(graph_capable=lambda device: True))
    with caplog.at_level("WARNING", logger="dgserve.engine"):
        assert step_graphs(fake, EngineConfig(max_running=5)) is None
    assert "CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing " \
           "((1, 2, 3, 4, 6)))" in caplog.text


def test_no_graphs_where_the_grouped_gemm_reads_its_counts_back(tiny_dir, monkeypatch):
    """Without Triton a float32 GPU runs a GEMM per expert, which reads the counts back: nothing to capture."""
    from dgserve.kernels import dispatch

    experts = LocalExperts(load_checkpoint(tiny_dir).model.experts.layers)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert not experts.graph_capable(torch.device("cuda"))
    monkeypatch.setenv("DGSERVE_KERNELS", "torch")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert not experts.graph_capable(torch.device("cuda"))
