"""Images over the OpenAI-compatible API through Ray Serve's proxy with the official client: `image_url` parts with
data: URLs give the gRPC API's tokens, video frames too; remote URLs and bad data are 400 naming the part."""

from __future__ import annotations

import base64

import openai
import pytest

from dgserve_client import Client
from tests.model.test_media import encoded

from .test_http import request

KNOBS = {"max_denoising_steps": 4, "return_token_ids": True}


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def test_image_and_frames_as_data_urls_give_the_grpc_apis_tokens(endpoint, http_base):
    address, _, _ = endpoint
    png, jpeg = encoded(60, 80, seed=1), encoded(90, 40, "JPEG", seed=2)
    frames = [encoded(48, 64, seed=30 + i) for i in range(4)]
    c = openai.OpenAI(base_url=http_base, api_key="none", max_retries=0)
    content = [{"type": "image_url", "image_url": {"url": data_url(png), "detail": "low"}},
               {"type": "text", "text": "and"},
               {"type": "image_url", "image_url": {"url": data_url(jpeg, "image/jpeg"), "visual_token_budget": 70}},
               {"type": "video_url", "video_url": {"frames": [data_url(f) for f in frames], "fps": 2}},
               {"type": "text", "text": "What do you see?"}]
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], seed=7,
                                  max_tokens=64, extra_body=KNOBS)
    grpc_content = [{"type": "image", "data": png, "visual_token_budget": 70}, {"type": "text", "text": "and"},
                    {"type": "image", "data": jpeg, "visual_token_budget": 70},
                    {"type": "video", "frames": frames, "fps": 2, "visual_token_budget": 70},
                    {"type": "text", "text": "What do you see?"}]
    with Client(address) as g:
        chat = g.chat([{"role": "user", "content": grpc_content}], seed=7, max_new_tokens=64, max_denoising_steps=4)
    assert r.choices[0].model_extra["token_ids"] == list(chat.token_ids)
    assert r.usage.prompt_tokens == chat.usage.prompt_tokens > 4 * 12 + 2 * 30  # the soft tokens are counted


URL = "messages[0].content[0].image_url.url"


@pytest.mark.parametrize(("part", "param"), [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, URL),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, URL),
    ({"type": "image_url", "image_url": {"url": data_url(b"GIF89a....", "image/gif")}}, "messages[0].content[0]"),
    ({"type": "image_url", "image_url": {"url": data_url(encoded(20, 20)), "detail": "ultra"}},
     "messages[0].content[0].image_url.detail"),
    ({"type": "input_audio", "input_audio": {}}, "messages[0].content[0].type"),
])
def test_bad_image_parts_are_400_naming_the_part(endpoint, http_base, part, param):
    status, _, body = request(f"{http_base}/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]})
    assert status == 400 and body["error"]["param"] == param, body
    if "https" in str(part):
        assert "fetches nothing" in body["error"]["message"]
    status, _, _ = request(f"{http_base[:-3]}/health")
    assert status == 200
