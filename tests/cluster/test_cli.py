"""`dgserve generate` and `dgserve make-tiny` as a user runs them (subprocesses; bad inputs by `main` in this
process, and two of them as subprocesses too)."""

from __future__ import annotations

import json
import os
import re
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


@pytest.mark.parametrize(("attention", "experts"), [(1, 2), (2, 1)])
def test_contract_holds_with_the_experts_on_their_own_ranks(ref_folders, attention, experts):
    """--attention-ranks A --expert-ranks E: local processes over gloo, the same token ids as the reference."""
    folder = ref_folders("a")
    prompt, seed, n = [2, 17, 33, 41, 5], 5, 2 * SPECS["a"].canvas_length + 1
    r = dgserve("generate", "--model", str(folder), "--prompt-ids", ",".join(map(str, prompt)), "--seed",
                str(seed), "--max-new-tokens", str(n), "--dtype", "float32", "--max-denoising-steps", "10", "--json",
                "--attention-ranks", str(attention), "--expert-ranks", str(experts))
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    expected, _ = reference_generate(load_reference(folder), prompt, seed, max_new_tokens=n, max_denoising_steps=10)
    assert out["token_ids"] == expected
    assert out["ranks"] == {"attention_ranks": attention, "expert_ranks": experts}


def test_default_model_with_a_text_prompt(tmp_path):
    r = dgserve("generate", "--prompt", "Hello there", "--seed", "3", "--max-new-tokens", "40",
                "--max-denoising-steps", "6", "--json", env={"DGSERVE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert len(out["token_ids"]) == 64 and isinstance(out["text"], str)
    assert out["steps_per_block"] == [6, 6] and {"total_s", "time_to_first_block_s"} <= set(out["timings"])
    assert (tmp_path / "tiny-v2-seed0" / "config.json").is_file()  # made on first use
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
    (["--prompt-ids", "2,5", "--expert-ranks", "-1"], "expert_ranks"),
    (["--prompt-ids", "2,5", "--attention-ranks", "0", "--expert-ranks", "1"], "attention_ranks"),
    (["--prompt-ids", "2,5,999999", "--expert-ranks", "1"], "outside the vocabulary"),
])
def test_bad_input_is_a_clear_error(tiny_dir, capsys, args, message):
    code, _, err = in_process(capsys, "generate", "--model", str(tiny_dir), *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_bad_input_exits_2_with_the_message_and_no_traceback_as_a_user_runs_it(tiny_dir, tmp_path):
    """The cases above run `main` in this process (a subprocess each costs seconds); the command itself too."""
    r = dgserve("generate", "--model", str(tiny_dir), "--prompt-ids", "2,5,999999")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt_ids": [2, 5], "temperature": 1}')
    r = dgserve("generate", "--model", str(tiny_dir), "--prompts-file", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "line 1: temperature: unknown field" in r.stderr and "Traceback" not in r.stderr


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`dgserve ARGS` as `main(ARGS)` here: (exit code, stdout, stderr); torch's thread count is restored after."""
    import torch

    from dgserve.cluster.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_make_tiny_command(tmp_path):
    r = dgserve("make-tiny", str(tmp_path / "t"), "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t" / "dgserve_tiny.json").read_text())["seed"] == 7
    bad = dgserve("make-tiny", str(tmp_path / "u"), "--preset", "huge")
    assert bad.returncode == 2 and "preset" in bad.stderr


def test_prompts_file_runs_through_the_engine_and_matches_single_runs(tiny_dir, tmp_path, capsys):
    lines = [{"prompt_ids": [2, 5, 6, 7], "seed": 3},
             {"prompt": "Hello there", "seed": 1, "max_new_tokens": 64, "max_denoising_steps": 6},
             {"prompt_ids": [2, 9, 10], "t_max": 1.0, "request_id": "mine", "seed": 4}]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    r = dgserve("generate", "--model", str(tiny_dir), "--prompts-file", str(f), "--max-new-tokens", "32",
                "--max-denoising-steps", "8")
    assert r.returncode == 0, r.stderr
    out = sorted((json.loads(x) for x in r.stdout.strip().splitlines()), key=lambda o: o["index"])
    assert [o["request_id"] for o in out] == ["line-0", "line-1", "mine"]
    # Through the engine together: one iteration steps every running canvas, so the run takes fewer iterations
    # than the requests' own steps added up (one at a time it takes at least that many).
    summary = re.search(r"\[3 requests, 0 failed, (\d+) engine iterations\]", r.stderr)
    assert summary, r.stderr
    steps = sum(sum(o["steps_per_block"]) for o in out)
    assert int(summary.group(1)) < steps, (summary.group(0), steps)
    singles = [["--prompt-ids", "2,5,6,7", "--seed", "3", "--max-new-tokens", "32", "--max-denoising-steps", "8"],
               ["--prompt", "Hello there", "--seed", "1", "--max-new-tokens", "64", "--max-denoising-steps", "6"],
               ["--prompt-ids", "2,9,10", "--seed", "4", "--t-max", "1.0", "--max-new-tokens", "32",
                "--max-denoising-steps", "8"]]
    for o, args in zip(out, singles, strict=True):  # single runs by `main` here: a subprocess each costs seconds
        code, stdout, err = in_process(capsys, "generate", "--model", str(tiny_dir), *args, "--json")
        assert code == 0, err
        one = last_json(stdout)
        assert o["token_ids"] == one["token_ids"] and o["steps_per_block"] == one["steps_per_block"]


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt_ids": [2, 5]}\n{"prompt_ids": [2, 5]', "line 2: not a JSON object"),
    ('{"prompt_ids": [2, 5], "temperature": 1}', "line 1: temperature: unknown field"),
    ('{"prompt_ids": []}', "line 1: prompt_ids: is empty"),
    ('{"prompt_ids": [2, 5], "prompt": "hi"}', "exactly one of prompt"),
    ('{"prompt_ids": [2, 5], "t_max": 0.1}', "line 1: sampler: invalid t_max"),
    ('{"prompt_ids": [2, 5], "seed": -3}', "seed"),
    ("\n\n", "holds no requests"),
])
def test_prompts_file_errors_name_the_line_and_field(tiny_dir, tmp_path, capsys, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    code, _, err = in_process(capsys, "generate", "--model", str(tiny_dir), "--prompts-file", str(f))
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_generate_reads_images_and_a_video_with_the_prompt(tiny_dir, capsys, tmp_path):
    from tests.model.test_media import encoded, video_file

    (tmp_path / "a.png").write_bytes(encoded(60, 90, "PNG", seed=1))
    (tmp_path / "b.webp").write_bytes(encoded(40, 40, "WEBP", seed=2))
    (tmp_path / "c.png").write_bytes(encoded(60, 90, "PNG", seed=3))
    video_file(tmp_path / "v.mp4", frames=20, rate=10)
    common = ("generate", "--model", str(tiny_dir), "--prompt", "What is this?", "--max-new-tokens", "32",
              "--max-denoising-steps", "2", "--json")
    code, out, err = in_process(capsys, *common)
    text_only = last_json(out)
    code, out, err = in_process(capsys, *common, "--image", str(tmp_path / "a.png"), "--image",
                                str(tmp_path / "b.webp"), "--visual-budget", "70", "--video", str(tmp_path / "v.mp4"),
                                "--video-fps", "2")
    assert code == 0, err
    res = last_json(out)
    assert (res["images"], res["video_frames"]) == (2, 4)
    assert res["prompt_tokens"] > text_only["prompt_tokens"] + 2 * 2 + 4 * 2  # soft tokens between boi and eoi
    code, out, _ = in_process(capsys, *common, "--image", str(tmp_path / "c.png"), "--image",
                              str(tmp_path / "b.webp"), "--visual-budget", "70", "--video", str(tmp_path / "v.mp4"),
                              "--video-fps", "2")
    other = last_json(out)
    assert other["prompt_tokens"] == res["prompt_tokens"] and other["token_ids"] != res["token_ids"]


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "{bad}"], "--image {bad}: is not a readable image"),
    (["--image", "{missing}"], "No such file"),
    (["--image", "{png}", "--visual-budget", "100"], "use one of 70, 140, 280, 560, 1120"),
    (["--image", "{png}", "--attention-ranks", "1", "--expert-ranks", "1"], "images and videos run in one process"),
])
def test_bad_media_is_a_clear_error(tiny_dir, capsys, tmp_path, args, message):
    from tests.model.test_media import encoded

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "ok.png").write_bytes(encoded(20, 20))
    paths = {"bad": tmp_path / "bad.png", "missing": tmp_path / "missing.png", "png": tmp_path / "ok.png"}
    args = [a.format(**paths) for a in args]
    message = message.format(**paths)
    code, _, err = in_process(capsys, "generate", "--model", str(tiny_dir), "--prompt", "hi", *args)
    assert code == 2 and message in err and "Traceback" not in err
