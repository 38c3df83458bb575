"""The chat core's image and video parts (cluster/gateway/chat/media.py, messages.py), without a server: their
forms, and the limits checked before and while they are decoded."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from dgserve.cluster.gateway.chat.media import MAX_MEDIA_ITEMS, process
from dgserve.cluster.gateway.chat.messages import check_size, parse_conversation, prompt_of
from dgserve.model.errors import InputError
from dgserve.model.media import MediaProcessor
from dgserve.model.tokenizer import load_tokenizer
from tests.model.test_media import encoded


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return MediaProcessor.from_checkpoint(tiny_dir)


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_openai_and_grpc_forms_give_the_same_prompt(tiny_dir, proc):
    tok, png = load_tokenizer(tiny_dir), encoded(60, 80, seed=1)
    openai_form = parse_conversation(user({"type": "text", "text": "See"},
                                          {"type": "image_url", "image_url": {"url": url(png), "detail": "low"}}))
    grpc_form = parse_conversation(user({"type": "text", "text": "See"},
                                        {"type": "image", "data": png, "visual_token_budget": 70}))
    a, b = prompt_of(tok, proc, openai_form), prompt_of(tok, proc, grpc_form)
    assert a[0] == b[0] and [m.digest for m in a[1]] == [m.digest for m in b[1]] and len(a[1]) == 1


def test_soft_tokens_past_the_limit_stop_the_request_at_the_part_that_passes_it(proc):
    parts = parse_conversation(user(*[{"type": "image", "data": encoded(64, 64, seed=i), "visual_token_budget": 280}
                                      for i in range(4)])).media()
    calls = []
    real = proc.image

    def counting(*args, **kw):
        calls.append(args[1])
        return real(*args, **kw)

    proc.image = counting
    try:
        with pytest.raises(InputError, match="past the limit of 600 a request") as e:
            process(proc, parts, max_tokens=600)
    finally:
        del proc.image
    assert e.value.field == "messages[0].content[2]" and len(calls) == 3  # the fourth is never decoded


def test_counts_and_bytes_are_refused_before_anything_is_decoded(proc):
    frames = [encoded(8, 8)] * (MAX_MEDIA_ITEMS // 4 + 1)
    many = parse_conversation(user(*[{"type": "video", "frames": frames}] * 4)).media()
    with pytest.raises(InputError, match=f"{4 * len(frames)} images and video frames; the limit is {MAX_MEDIA_ITEMS}"):
        process(proc, many)
    big = parse_conversation(user({"type": "image", "data": encoded(64, 64)})).media()
    with pytest.raises(InputError, match="exceed the limit of 100 bytes \\(gateway.max_media_bytes\\)"):
        process(proc, big, max_media_bytes=100)


def test_image_payloads_are_not_text_but_everything_else_is():
    png = url(encoded(200, 200))
    check_size(user({"type": "image_url", "image_url": {"url": png}}), None, 100)  # base64 is not text
    with pytest.raises(InputError, match="exceed the limit"):  # a message that calls itself an image is text
        check_size([{"role": "user", "type": "image", "content": "x" * 1000}], None, 100)
    with pytest.raises(InputError, match="exceed the limit"):
        check_size(user({"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "y" * 200}), None,
                   100)


def png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_by_its_header(proc):
    with pytest.raises(InputError, match="is too large an image") as e:
        proc.image(png_header(30000, 30000), "messages[0].content[0]")
    assert e.value.field == "messages[0].content[0]"


def test_transparency_is_white_as_the_reference_makes_it(proc):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (48, 48), (0, 0, 0, 0)).save(buf, format="PNG")
    assert proc.image(buf.getvalue(), "i", 70).values().min() == 1.0  # composited onto white, not black


def test_only_known_video_containers_are_opened(proc):
    playlist = b"#EXTM3U\n#EXT-X-VERSION:3\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    with pytest.raises(InputError, match="expected MP4/MOV, Matroska/WebM or AVI"):
        proc.video(playlist, "messages[0].content[0]")
