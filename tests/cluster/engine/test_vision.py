"""Image and video-frame prompts in the engine: the tower runs on the executor for the iteration's images at once,
requests with images batch with text-only ones, a prefill chunk never ends inside an image, and the prefix cache
keys hold the images."""

from __future__ import annotations

import pytest

from dgserve.cluster.engine import EngineRequest
from dgserve.model.errors import InputError
from dgserve.model.generate import generate
from dgserve.model.media import MediaItem, MediaProcessor
from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer
from tests.model.test_media import encoded

from .conftest import held_by_requests, make_engine, settings


@pytest.fixture(scope="module")
def media(tiny):
    """The tokenizer, and four images: three of one grid (60 x 80 at 70 tokens) and one of another."""
    proc = MediaProcessor.from_checkpoint(tiny.folder)
    images = [proc.image(encoded(60, 80, seed=s), f"i{s}", 70) for s in range(3)]
    images.append(proc.image(encoded(90, 40, seed=3), "i3", 70))
    return load_tokenizer(tiny.folder), images, proc


def request(tiny, tok, text: str, images: list[MediaItem], seed: int, videos=()) -> EngineRequest:
    ids = chat_prompt_ids(tok, text, images=images, videos=videos)
    frames = [f for v in videos for f in v.frames]
    return EngineRequest(ids, settings(tiny, max_new_tokens=64, max_denoising_steps=4), seed=seed,
                         media=tuple(images) + tuple(frames))


def alone(tiny, r: EngineRequest) -> list[int]:
    return generate(tiny.model, r.prompt_ids, r.settings, seed=r.seed, media=r.media).token_ids


def test_requests_with_images_batch_with_text_ones_and_get_generates_tokens(tiny, media):
    tok, images, proc = media
    video = proc.frames([encoded(48, 64, seed=10 + i) for i in range(3)], "video", fps=1.0)
    reqs = [request(tiny, tok, "What is this?", images[:1], 0), request(tiny, tok, "Plain text, no image.", [], 1),
            request(tiny, tok, "Compare these two.", images[1:3], 2),
            request(tiny, tok, "What happens?", [], 3, videos=[video])]
    engine = make_engine(tiny, max_running=4)
    streams = [engine.submit(r) for r in reqs]
    outcomes = []
    while not engine.idle:
        outcomes.append(engine.step())
    assert [list(s.result(0).token_ids) for s in streams] == [alone(tiny, r) for r in reqs]
    images_per_step = [o.images for o in outcomes if o is not None and o.images]
    assert images_per_step == [1 + 2 + 3]  # every image and frame in one tower call, in the first iteration
    assert all(o.vision_s > 0 for o in outcomes if o is not None and o.images)


def test_a_chunk_never_ends_inside_an_image_and_batching_keeps_the_tokens(tiny, media):
    tok, images, _ = media
    r = request(tiny, tok, "Describe the picture in detail, please.", images[3:], 5)
    engine = make_engine(tiny, prefill_chunk=16, max_prefill_tokens=64, prefix_cache=False)
    stream = engine.submit(r)
    segments = set()
    while not engine.idle:
        engine.step()
        segments |= {(a, b) for q in engine.driver.running for a, b, kind in q.segments if kind.value == "prefill"}
    ids = list(r.prompt_ids)
    start = ids.index(tiny.config.image_token_id)
    stop = start + images[3].soft_tokens
    assert start % 16 and stop % 16 and stop - start > 16  # the image starts and ends mid-chunk, and is longer
    assert not any(start < b < stop for _, b in segments)  # no chunk ends inside its soft tokens ...
    assert any(b == start for _, b in segments)  # ... the one before ends where they start ...
    assert (start, stop) in segments  # ... and the next holds all of them
    assert all(a % 16 == 0 if a < start else (a - stop) % 16 == 0 for a, _ in segments if a != start)
    solo = list(stream.result(0).token_ids)
    batched_engine = make_engine(tiny, prefill_chunk=16, max_prefill_tokens=64, prefix_cache=False, max_running=3)
    others = [request(tiny, tok, "Another question.", [], 6), request(tiny, tok, "And one with a picture.",
                                                                       images[:1], 7)]
    streams = [batched_engine.submit(x) for x in (others[0], r, others[1])]
    batched_engine.run_until_idle()
    assert list(streams[1].result(0).token_ids) == solo


def test_the_prefix_cache_keys_hold_the_images(tiny, media):
    tok, images, _ = media
    first = request(tiny, tok, "What is this?", images[:1], 0)
    same = request(tiny, tok, "What is this?", images[:1], 1)
    other = request(tiny, tok, "What is this?", images[1:2], 2)  # the same ids: another picture
    assert first.prompt_ids == other.prompt_ids
    engine = make_engine(tiny, prefill_chunk=16, max_prefill_tokens=64)
    got = {}
    for name, r in (("first", first), ("same", same), ("other", other)):
        s = engine.submit(r)
        engine.run_until_idle()
        got[name] = s.result(0)
    start = list(first.prompt_ids).index(tiny.config.image_token_id)
    assert got["same"].stats.cached_tokens == len(first.prompt_ids)  # the same picture: all of it
    assert got["other"].stats.cached_tokens == start  # the text before the picture (a chunk ends where it starts)
    off = make_engine(tiny, prefill_chunk=16, max_prefill_tokens=64, prefix_cache=False)
    for name, r in (("same", same), ("other", other)):
        s = off.submit(r)
        off.run_until_idle()
        assert s.result(0).token_ids == got[name].token_ids, name


def test_bad_media_is_refused_at_submit_naming_it(tiny, media):
    tok, images, _ = media
    plain = chat_prompt_ids(tok, "hi")
    engine = make_engine(tiny)
    s = settings(tiny, max_new_tokens=32)
    with pytest.raises(InputError, match="0 image/video soft-token run"):
        engine.submit(EngineRequest(plain, s, media=(images[0],)))
    with_image = chat_prompt_ids(tok, "hi", images=images[:1])
    with pytest.raises(InputError, match="1 image/video soft-token run"):
        engine.submit(EngineRequest(with_image, s))
    with pytest.raises(InputError, match="media: expected a sequence of processed images"):
        engine.submit(EngineRequest(with_image, s, media=("not an image",)))
    import numpy as np

    huge = MediaItem("image", images[0].pixels, np.full_like(images[0].positions, 5000), images[0].soft_tokens, "x")
    with pytest.raises(InputError, match="media\\[0\\]: a patch grid of 5001 x 5001") as e:
        engine.submit(EngineRequest(with_image, s, media=(huge,)))
    assert e.value.field == "media[0]"


def test_a_requests_reservation_holds_its_image_rows(tiny, media):
    tok, images, _ = media
    r = request(tiny, tok, "Two pictures.", images[:2], 0)
    engine = make_engine(tiny)
    engine.submit(r)
    engine.step()
    n = sum(i.soft_tokens for i in images[:2])
    assert held_by_requests(engine) == engine.sizes.request(len(r.prompt_ids), n)
    assert engine.sizes.request(0, n) - engine.sizes.request(0) == n * tiny.config.text.hidden_size * 4  # float32
    engine.run_until_idle()
    assert held_by_requests(engine) == 0
