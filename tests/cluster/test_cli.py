"""`dgserve generate` and `dgserve make-tiny` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.reference import SPECS, load_reference, reference_generate


def dgserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgserve.cluster.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(("name", "seed"), [("a", 5), ("c", 2)])
def test_contract_same_token_ids_as_the_reference(ref_folders, name, seed):
    folder = ref_folders(name)
    C = SPECS[name].canvas_length
    prompt = [2, 17, 33, 41, 5]
    n = 2 * C + 1  # output grows by whole canvases: 3 blocks
    r = dgserve("generate", "--model", str(folder), "--prompt-ids", ",".join(map(str, prompt)), "--seed",
                str(seed), "--max-new-tokens", str(n), "--dtype", "float32", "--max-denoising-steps", "10", "--json")
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    expected, drafts = reference_generate(load_reference(folder), prompt, seed, max_new_tokens=n,
                                          max_denoising_steps=10)
    assert out["token_ids"] == expected and len(expected) == 3 * C
    assert out["text"] is None  # save_pretrained wrote no tokenizer
    assert sum(out["steps_per_block"]) == len(drafts) and out["tokens_per_forward"] > 0


def test_default_model_with_a_text_prompt(tmp_path):
    r = dgserve("generate", "--prompt", "Hello there", "--seed", "3", "--max-new-tokens", "40",
                "--max-denoising-steps", "6", "--json", env={"DGSERVE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert len(out["token_ids"]) == 64 and isinstance(out["text"], str)
    assert out["steps_per_block"] == [6, 6] and {"total_s", "time_to_first_block_s"} <= set(out["timings"])
    assert (tmp_path / "tiny-v1-seed0" / "config.json").is_file()  # made on first use
    again = dgserve("generate", "--prompt", "Hello there", "--seed", "3", "--max-new-tokens", "40",
                    "--max-denoising-steps", "6", "--json", env={"DGSERVE_HOME": str(tmp_path)})
    assert last_json(again.stdout)["token_ids"] == out["token_ids"]


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt-ids", "2,5,999999"], "outside the vocabulary"),
    (["--prompt-ids", "2,929"], "image"),
    (["--prompt-ids", ""], "empty"),
    (["--prompt", ""], "prompt: is empty"),
    (["--prompt-ids", "2,5", "--max-denoising-steps", "0"], "max_denoising_steps"),
    (["--prompt-ids", "2,5", "--t-max", "0.1"], "t_max"),
    (["--prompt-ids", "2,5", "--max-new-tokens", "40000"], "context"),
    (["--prompt-ids", "2,5", "--dtype", "float16"], "dtype"),
    (["--prompt-ids", "2,5", "--model", "/nonexistent/folder"], "no such folder"),
    (["--prompt-ids", "2,x"], "comma-separated integers"),
])
def test_bad_input_is_a_clear_error(tiny_dir, args, message):
    r = dgserve("generate", "--model", str(tiny_dir), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_make_tiny_command(tmp_path):
    r = dgserve("make-tiny", str(tmp_path / "t"), "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t" / "dgserve_tiny.json").read_text())["seed"] == 7
    bad = dgserve("make-tiny", str(tmp_path / "u"), "--preset", "huge")
    assert bad.returncode == 2 and "preset" in bad.stderr
