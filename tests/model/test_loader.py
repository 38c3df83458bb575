"""Checkpoint loading: bad checkpoints name the tensor, expert filters, dtypes, the hub path offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgserve.model.errors import CheckpointError, ConfigError
from dgserve.model.loader import load_checkpoint, resolve_checkpoint

EMBED = "model.decoder.embed_tokens.weight"
Q0 = "model.decoder.layers.0.self_attn.q_proj.weight"


def _rewrite_shard(folder, name, change):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, shard)
    return index


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "ck")
    index = _rewrite_shard(folder, Q0, lambda t: t.pop(Q0))
    del index["weight_map"][Q0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj\.weight .*missing"):
        load_checkpoint(folder)


def test_wrong_shape_names_tensor_and_shapes(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "ck")
    _rewrite_shard(folder, Q0, lambda t: t.__setitem__(Q0, t[Q0][:-1].clone()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    assert Q0 in str(e.value) and "[64, 64]" in str(e.value) and "[63, 64]" in str(e.value)


def test_missing_shard_and_missing_config(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "ck")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(folder)


@torch.inference_mode()
def test_expert_filter_loads_a_subset_that_computes_the_same(tiny_dir):
    full = load_checkpoint(tiny_dir)
    part = load_checkpoint(tiny_dir, experts=[1, 2, 5])
    none = load_checkpoint(tiny_dir, experts=[])
    assert part.expert_ids == (1, 2, 5) and none.expert_ids == ()
    assert part.model.experts.layers[0].gate_up.shape[0] == 3 and none.model.experts.layers == []
    assert torch.equal(part.model.experts.layers[0].gate_up[2], full.model.experts.layers[0].gate_up[5])
    rows = torch.randn(6, 64)
    ids = torch.tensor([[1, 5], [2, 1], [5, 2], [1, 2], [5, 1], [2, 5]])
    w = torch.rand(6, 2)
    assert torch.allclose(part.model.experts(3, rows, ids, w), full.model.experts(3, rows, ids, w), atol=1e-6)
    with pytest.raises(RuntimeError, match=r"experts \[0\] are not held"):
        part.model.experts(0, rows, torch.zeros(6, 2, dtype=torch.long), w)
    with pytest.raises(ConfigError, match="experts"):
        load_checkpoint(tiny_dir, experts=[99])


def test_dtypes(tiny_dir):
    assert load_checkpoint(tiny_dir, dtype="bfloat16").model.weights.embed.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        load_checkpoint(tiny_dir, dtype="float8")


def test_bad_model_argument(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "file")


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_hub_id_offline_not_cached_gives_a_clear_error(tmp_path):
    r = _run("from dgserve.model.loader import load_checkpoint; load_checkpoint('google/diffusiongemma-26B-A4B-it')",
             {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode != 0
    assert "HF_HUB_OFFLINE=1" in r.stderr and "google/diffusiongemma-26B-A4B-it" in r.stderr


def test_hub_id_offline_from_the_cache(tiny_dir, tmp_path):
    """A hub snapshot in the standard cache layout is found by snapshot_download with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hub" / "models--acme--tiny-dg"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = _run("from dgserve.model.loader import load_checkpoint; ck = load_checkpoint('acme/tiny-dg');"
             "print(ck.folder, ck.config.text.num_layers)", {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert commit in r.stdout and r.stdout.strip().endswith(" 6")


def test_an_attention_rank_reads_no_expert_tensor_and_an_expert_rank_only_its_experts(tiny_dir):
    """The bytes each rank reads and holds: attention (experts=[]) + two expert shards read every needed tensor
    exactly once; an expert shard holds its experts of every layer and nothing else."""
    from dgserve.cluster.experts.partition import ExpertPartition
    from dgserve.model.loader import CheckpointReader, load_expert_shard
    from dgserve.model.weights import expert_specs

    attention = load_checkpoint(tiny_dir, experts=[])
    cfg = attention.config.text
    part = ExpertPartition.balanced(cfg.num_experts, 2)
    shards = [load_expert_shard(tiny_dir, part.experts_of(j)) for j in range(2)]
    reader = CheckpointReader(tiny_dir)
    size = {"F32": 4, "BF16": 2, "F16": 2}
    stored = 0  # every expert tensor's bytes, as stored
    for i in range(cfg.num_layers):
        for spec in expert_specs(cfg, i).values():
            name = reader.find(spec)
            sl = reader._file(reader.weight_map[name]).get_slice(name)
            stored += torch.Size(sl.get_shape()).numel() * size[sl.get_dtype()]
    reader.close()
    assert attention.model.experts.layers == [] and attention.bytes_read > 0
    assert [s.expert_ids for s in shards] == [part.experts_of(0), part.experts_of(1)]
    assert sum(s.bytes_read for s in shards) == stored  # each expert read once, by its rank only
    assert shards[0].bytes_read == stored * len(part.experts_of(0)) // cfg.num_experts
    full = load_checkpoint(tiny_dir)
    assert full.bytes_read == attention.bytes_read + stored  # the attention rank read all but the experts
    held = sum(s.nbytes() for s in shards)
    assert held == sum(t.numel() * 4 for w in full.model.experts.layers for t in (w.gate_up, w.down))
    assert torch.equal(shards[1].layers[2].down[0], full.model.experts.layers[2].down[part.experts_of(1)[0]])


def test_weights_stream_to_their_device_one_tensor_at_a_time(tiny_dir):
    """Loaded onto the meta device: every tensor is there, and host memory held at most one tensor at a time."""
    from dgserve.model.loader import load_checkpoint

    ck = load_checkpoint(tiny_dir, dtype="float32", device="meta")
    assert ck.model.weights.embed.device.type == "meta"
    assert all(w.gate_up.device.type == "meta" for w in ck.model.experts.layers)
    embed = ck.model.weights.embed
    assert 0 < ck.largest_read <= embed.numel() * 4 and ck.largest_read < ck.bytes_read / 4  # a tensor, not the model
