"""Images and video frames through the gRPC Chat API against the package's local cluster: one image, two in one
message, four frames, bad image bytes; the unit's tokens are those of `generate` on the same processed prompt."""

from __future__ import annotations

import json
import re

import pytest

from dgserve.cluster.gateway.chat import parse_conversation
from dgserve.cluster.gateway.chat.messages import prompt_of
from dgserve.model.generate import generate
from dgserve.model.media import MediaProcessor
from dgserve.model.sampler import SamplerSettings
from dgserve.model.tokenizer import load_tokenizer
from dgserve_client import Client, InvalidArgument
from tests.model.test_media import encoded

SHORT = {"max_new_tokens": 64, "max_denoising_steps": 4}


@pytest.fixture(scope="module")
def local(tiny, tiny_dir):
    """What the unit computes, here: the tokenizer, the processor and the model."""
    return load_tokenizer(tiny_dir), MediaProcessor.from_checkpoint(tiny_dir), tiny


def expected(local, messages: list[dict], seed: int) -> tuple[list[int], list[int]]:
    """(prompt ids, new tokens) of the same chat in this process: the chat core, the processor, generate."""
    tok, proc, ck = local
    ids, media = prompt_of(tok, proc, parse_conversation(messages))
    settings = SamplerSettings.from_defaults(ck.generation, **SHORT)
    return ids, generate(ck.model, ids, settings, seed=seed, media=media).token_ids


def image(seed: int, h: int = 60, w: int = 80, fmt: str = "PNG") -> dict:
    return {"type": "image", "data": encoded(h, w, fmt, seed), "visual_token_budget": 70}


def test_one_image_gives_generates_tokens(endpoint, local):
    address, _, _ = endpoint
    messages = [{"role": "user", "content": [image(1), {"type": "text", "text": "What is this?"}]}]
    ids, tokens = expected(local, messages, seed=2)
    with Client(address) as c:
        reply = c.chat(messages, seed=2, **SHORT)
        other = c.chat([{"role": "user", "content": [image(9), {"type": "text", "text": "What is this?"}]}],
                       seed=2, **SHORT)
    assert list(reply.token_ids) == tokens and reply.usage.prompt_tokens == len(ids)
    assert other.usage.prompt_tokens == len(ids) and list(other.token_ids) != tokens  # the picture is read


def test_two_images_in_one_message_in_order(endpoint, local):
    address, _, _ = endpoint
    a, b = image(3, 60, 80, "JPEG"), image(4, 90, 40, "WEBP")
    text = [{"type": "text", "text": "Compare "}, {"type": "text", "text": " with "}]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [text[0], a, text[1], b, {"type": "text", "text": "."}]}]
    ids, tokens = expected(local, messages, seed=5)
    tok, proc, ck = local
    soft = [proc.image(x["data"], "x", 70).soft_tokens for x in (a, b)]
    assert ids.count(ck.config.image_token_id) == sum(soft)
    with Client(address) as c:
        reply = c.chat(messages, seed=5, **SHORT)
        streamed = list(c.chat_stream(messages, seed=5, **SHORT))
    assert list(reply.token_ids) == tokens == list(streamed[-1].final.token_ids)


def test_four_frames_are_a_video_with_timestamps(endpoint, local):
    address, _, _ = endpoint
    tok, proc, ck = local
    frames = [encoded(48, 64, seed=20 + i) for i in range(4)]
    messages = [{"role": "user", "content": [{"type": "video", "frames": frames, "fps": 2.0,
                                              "visual_token_budget": 70},
                                             {"type": "text", "text": "What happens?"}]}]
    ids, tokens = expected(local, messages, seed=6)
    per_frame = proc.image(frames[0], "f", 70).soft_tokens
    assert ids.count(ck.config.video_token_id) == 4 * per_frame
    text = tok.decode(ids)
    assert [m for m in re.findall(r"\d\d:\d\d", text)] == ["00:00", "00:00", "00:01", "00:01"]
    with Client(address) as c:
        reply = c.chat(messages, seed=6, **SHORT)
    assert list(reply.token_ids) == tokens and reply.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(("part", "field"), [
    ({"type": "image", "data": b"\x89PNG\r\n\x1a\nnot really"}, "messages[0].parts[1]: is not a readable image"),
    ({"type": "image", "data": encoded(20, 20, "GIF")}, "messages[0].parts[1]: is a GIF image"),
    ({"type": "image", "data": encoded(20, 20), "visual_token_budget": 99}, "messages[0].parts[1].budget"),
    ({"type": "video", "frames": [encoded(8, 8)] * 33}, "messages[0].parts[1]: has 33 frames; the limit is 32"),
    ({"type": "video", "data": b"\x00" * 64}, "messages[0].parts[1]: could not be decoded as a video"),
])
def test_bad_images_are_invalid_argument_naming_the_part(endpoint, part, field):
    address, _, _ = endpoint
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]
    with Client(address) as c:
        with pytest.raises(InvalidArgument, match=re.escape(field)):
            c.chat(messages, **SHORT)
        assert c.health() == "SERVING"


def test_images_go_in_user_messages_only_and_text_goes_in_content_or_parts(endpoint):
    address, _, _ = endpoint
    with Client(address) as c, pytest.raises(InvalidArgument,
                                             match=re.escape("messages[0].parts[0]: images and videos go in user")):
        c.chat([{"role": "system", "content": [image(1)]}, {"role": "user", "content": "hi"}], **SHORT)


def test_the_client_cli_sends_images(endpoint, tmp_path, local):
    import subprocess
    import sys

    address, _, _ = endpoint
    (tmp_path / "a.png").write_bytes(encoded(60, 80, seed=1))
    out = subprocess.run([sys.executable, "-m", "dgserve_client.cli", "--target", address, "chat", "What is this?",
                          "--image", str(tmp_path / "a.png"), "--visual-budget", "70", "--seed", "2", "--json",
                          "--max-new-tokens", "64", "--max-denoising-steps", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    _, tokens = expected(local, [{"role": "user", "content": [image(1), {"type": "text", "text": "What is this?"}]}],
                         seed=2)
    assert res["token_ids"] == tokens


def test_model_info_says_what_images_the_endpoint_reads(endpoint, tiny_dir):
    from dgserve.cluster.config import parse_topology
    from dgserve.cluster.gateway.convert import limits_for, model_info
    from dgserve.model.config import load_generation_defaults, load_model_config

    from .conftest import MEDIA

    address, _, _ = endpoint
    with Client(address) as c:
        v = c.info().vision
    assert list(v.visual_token_budgets) == [70, 140, 280, 560, 1120]
    assert (v.default_image_budget, v.default_frame_budget, v.max_frames) == (280, 70, 32)
    assert v.max_media_bytes == MEDIA and list(v.image_formats) == ["PNG", "JPEG", "WEBP", "MPO"] and v.max_media_parts
    cfg = load_model_config(tiny_dir)
    text_only = model_info(parse_topology({}), cfg, load_generation_defaults(tiny_dir), limits_for(cfg, 512), "m", "v")
    assert not text_only.HasField("vision")
