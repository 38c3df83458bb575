"""Images and video frames into patches and prompts (model/media.py), and the tower's checks (model/vision.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dgserve.model.errors import InputError
from dgserve.model.generate import generate, validate_prompt
from dgserve.model.loader import load_checkpoint
from dgserve.model.media import (
    BUDGETS,
    MediaProcessor,
    check_media,
    chunk_bounds,
    expand_prompt,
    media_spans,
)
from dgserve.model.sampler import SamplerSettings
from dgserve.model.vision import ImagePatches, as_patches

TOKENS = {"image": "<|image|>", "video": "<|video|>", "boi": "<|image>", "eoi": "<image|>"}


def encoded(h: int, w: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def video_file(path, frames: int, rate: int = 10) -> bytes:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray((rng.random((48, 64, 3)) * 255).astype(np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return MediaProcessor.from_checkpoint(tiny_dir)


def test_the_checkpoint_files_give_the_defaults(proc):
    assert (proc.image_budget, proc.frame_budget, proc.max_frames) == (280, 70, 32)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_budget_bounds_the_soft_tokens_and_the_patches_are_a_grid(proc, fmt):
    data = encoded(300, 500, fmt)
    counts = []
    for budget in BUDGETS:
        item = proc.image(data, "image", budget)
        assert 0 < item.soft_tokens <= budget
        assert item.pixels.shape == (9 * item.soft_tokens, 768) and item.pixels.dtype == np.uint8  # codes travel
        assert item.values().dtype == np.float32 and 0 <= item.values().min() <= item.values().max() <= 1
        xs, ys = item.positions[:, 0], item.positions[:, 1]
        assert (xs.max() + 1) * (ys.max() + 1) == item.pixels.shape[0]  # no padding rows left
        assert (xs.max() + 1) % 3 == 0 and (ys.max() + 1) % 3 == 0  # whole 3x3 cells for pooling
        counts.append(item.soft_tokens)
    assert counts == sorted(counts) and counts[-1] > 4 * counts[0]
    assert proc.image(data, "image").soft_tokens == proc.image(data, "image", 280).soft_tokens  # the default


@pytest.mark.parametrize(("data", "message"), [
    (b"", "is empty"),
    (b"not an image at all", "not a readable image"),
    (encoded(40, 40)[:60], "corrupt or truncated"),
    (encoded(40, 40, "GIF"), "is a GIF image; expected PNG, JPEG or WebP"),
    (encoded(40, 40, "BMP"), "is a BMP image"),
])
def test_bad_image_bytes_are_refused_naming_the_part(proc, data, message):
    with pytest.raises(InputError, match=message) as e:
        proc.image(data, "messages[0].content[2]")
    assert e.value.field == "messages[0].content[2]"


def test_a_huge_image_is_refused_before_it_is_decoded(proc, monkeypatch):
    import dgserve.model.media as media

    monkeypatch.setattr(media, "MAX_PIXELS", 1000)
    with pytest.raises(InputError, match="40 x 30 pixels; the limit is 1,000"):
        proc.image(encoded(30, 40), "image")


def test_a_budget_outside_the_five_is_refused(proc):
    with pytest.raises(InputError, match="use one of 70, 140, 280, 560, 1120") as e:
        proc.image(encoded(30, 40), "images[1]", 100)
    assert e.value.field == "images[1].budget"


def test_frames_take_the_frame_budget_and_are_stamped_at_the_rate(proc):
    video = proc.frames([encoded(48, 64, seed=i) for i in range(4)], "video", fps=2.0)
    assert [f.kind for f in video.frames] == ["frame"] * 4
    assert {f.soft_tokens for f in video.frames} == {proc.image(encoded(48, 64), "x", 70).soft_tokens}
    assert video.timestamps == [0.0, 0.5, 1.0, 1.5]
    n = video.frames[0].soft_tokens
    text = expand_prompt("see <|video|>!", [], [video], TOKENS)
    frame = f"<|image>{'<|video|>' * n}<image|>"
    assert text == f"see 00:00 {frame} 00:00 {frame} 00:01 {frame} 00:01 {frame}!"
    with pytest.raises(InputError, match="has 33 frames; the limit is 32"):
        proc.frames([encoded(8, 8)] * 33, "video")
    with pytest.raises(InputError, match="expected a rate > 0"):
        proc.frames([encoded(8, 8)], "video", fps=0)


def test_a_video_file_is_sampled_at_the_stated_rate(proc, tmp_path):
    data = video_file(tmp_path / "v.mp4", frames=35, rate=10)  # 3.5 s
    video = proc.video(data, "messages[0].content[0]", fps=2.0)
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert all(f.soft_tokens <= 70 for f in video.frames)
    with pytest.raises(InputError, match="is 3.5 s long: at 20 frames a second that is more than 32 frames"):
        proc.video(data, "v", fps=20)
    with pytest.raises(InputError, match="could not be decoded as a video"):
        proc.video(b"\x00" * 100, "v")


def test_prompt_expansion_counts_and_places_each_image(proc):
    a, b = proc.image(encoded(30, 40), "a", 70), proc.image(encoded(60, 20), "b", 70)
    text = expand_prompt("<bos>x<|image|>y<|image|>z", [a, b], [], TOKENS)
    assert text == (f"<bos>x<|image>{'<|image|>' * a.soft_tokens}<image|>y"
                    f"<|image>{'<|image|>' * b.soft_tokens}<image|>z")
    with pytest.raises(InputError, match="1 given but the prompt has 2 image placeholder"):
        expand_prompt("<|image|><|image|>", [a], [], TOKENS)


def test_spans_chunks_and_checks():
    img, vid = 9, 8
    ids = [1, img, img, img, 2, 3, vid, vid, 4, vid, vid, 5]
    assert media_spans(ids, frozenset({img, vid})) == [(1, 4), (6, 8), (9, 11)]
    # a chunk never ends inside a run: it ends where the run starts, and the next holds the run (whole, if longer)
    assert chunk_bounds(12, 2, [(1, 4), (6, 8), (9, 11)]) == [(0, 1), (1, 4), (4, 6), (6, 8), (8, 9), (9, 11),
                                                               (11, 12)]
    assert chunk_bounds(5, 10, []) == [(0, 5)]

    class Item:
        def __init__(self, kind, n):
            self.kind, self.soft_tokens = kind, n

    items = [Item("image", 3), Item("frame", 2), Item("frame", 2)]
    assert check_media(ids, items, frozenset({img, vid}), img) == [(1, 4), (6, 8), (9, 11)]
    with pytest.raises(InputError, match="3 image/video soft-token run"):
        check_media(ids, items[:2], frozenset({img, vid}), img)
    with pytest.raises(InputError, match="run 0 at 1 has 3 tokens; its image gives 4"):
        check_media(ids, [Item("image", 4), *items[1:]], frozenset({img, vid}), img)
    with pytest.raises(InputError, match="does not match its frame"):
        check_media(ids, [Item("frame", 3), *items[1:]], frozenset({img, vid}), img)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_checkpoint(tiny_dir)


def test_an_image_prompt_chunked_gives_the_one_pass_states(tiny_model, proc):
    model, cfg = tiny_model.model, tiny_model.config
    items = [proc.image(encoded(50, 70, seed=s), f"i{s}", 70) for s in range(2)]
    ids = [2, 5, 6]
    for it in items:
        ids += [cfg.boi_token_id, *[cfg.image_token_id] * it.soft_tokens, cfg.eoi_token_id, 7]
    spans = media_spans(ids, cfg.media_token_ids)
    rows = model.vision.encode([as_patches(i) for i in items])
    one, chunked = model.new_cache(), model.new_cache()
    whole = model.encode(one, torch.tensor(ids), media=spans, soft_rows=rows)
    parts = model.encode(chunked, torch.tensor(ids), chunk=7, media=spans, soft_rows=rows)
    assert (whole - parts).abs().max() < 2e-4  # float32 rounding: a text prompt chunked differs by as much
    # the image rows are the tower's, not the placeholder's embedding: another image moves the states
    other = model.vision.encode([as_patches(proc.image(encoded(50, 70, seed=9), "o", 70)), as_patches(items[1])])
    moved = model.encode(model.new_cache(), torch.tensor(ids), media=spans, soft_rows=other)
    assert (moved - whole).abs().max() > 1e-3


def test_the_prompt_and_the_images_must_agree(tiny_model, proc):
    cfg = tiny_model.config
    item = proc.image(encoded(30, 30), "i", 70)
    ids = [2, cfg.boi_token_id, *[cfg.image_token_id] * item.soft_tokens, cfg.eoi_token_id]
    settings = SamplerSettings(max_new_tokens=32, max_denoising_steps=2)
    with pytest.raises(InputError, match="1 image/video soft-token run"):
        validate_prompt(ids, cfg, 32)  # soft tokens without their image
    with pytest.raises(InputError, match="0 image/video soft-token run"):
        validate_prompt([2, 5], cfg, 32, media=[item])  # an image without soft tokens
    assert len(generate(tiny_model.model, ids, settings, media=[item]).token_ids) == 32


def test_the_tower_refuses_a_grid_past_its_position_table(tiny_model):
    tower = tiny_model.model.vision
    side = tower.vc.position_embedding_size
    positions = torch.tensor([[x, 0] for x in range(side - 1, side + 8)])
    with pytest.raises(InputError, match=f"each side must stay under {side} patches") as e:
        tower.check(ImagePatches(torch.zeros(9, 768), positions), "media[0]")
    assert e.value.field == "media[0]"
    with pytest.raises(InputError, match="expected a positive multiple of 9"):
        tower.check(ImagePatches(torch.zeros(4, 768), torch.zeros(4, 2, dtype=torch.long)), "media[1]")
