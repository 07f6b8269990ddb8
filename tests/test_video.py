"""Video data: PyAV decoding of a generated clip, Qwen2-VL's frame sampling, and the video patch layout."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from silkie.data.images import ImageLoadError
from silkie.data.video import VideoSampling, decode_video, sample_indices
from silkie.dev.clips import colour_clip, encode_clip
from silkie.models.family import VideoClip
from silkie.models.hf_vlm.video import Qwen2VLVideos

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 250, 250), (250, 0, 250)]


def hf_sample_frames(total: int, native: float, fps: float, tp: int, low: int, high: int) -> list[int]:
    """transformers' Qwen2VLVideoProcessor.sample_frames with `fps` (5.24), transcribed."""
    high = math.floor(min(high, total) / tp) * tp
    count = total / native * fps
    count = min(max(count, low), high, total)
    count = math.floor(count / tp) * tp
    return torch.arange(0, total, total / count).int().tolist()


@pytest.mark.parametrize(
    ("total", "native", "fps", "low", "high"),
    [(12, 4, 2, 4, 64), (300, 30, 2, 4, 64), (3000, 30, 2, 4, 64), (10, 30, 2, 4, 64), (7, 25, 1, 2, 768)],
)
def test_frame_sampling_is_qwen2_vl_s(total, native, fps, low, high):
    sampling = VideoSampling(fps=fps, min_frames=low, max_frames=high, frame_multiple=2)
    assert sample_indices(total, native, sampling) == hf_sample_frames(total, native, fps, 2, low, high)


def test_a_clip_shorter_than_a_temporal_patch_keeps_its_frame():
    assert sample_indices(1, 30, VideoSampling()) == [0]


def test_decoding_samples_the_frames_and_their_rate():
    data = colour_clip(COLOURS * 2, size=(32, 24), fps=4)  # 12 frames = 3 s
    clip = decode_video("v.mkv", data, VideoSampling(fps=2, min_frames=2, max_frames=64))
    assert [frame.getpixel((5, 5)) for frame in clip.frames] == [COLOURS[i % 6] for i in (0, 2, 4, 6, 8, 10)]
    assert clip.frames[0].size == (32, 24) and clip.fps == pytest.approx(2.0)
    capped = decode_video("v.mkv", data, VideoSampling(fps=2, min_frames=2, max_frames=4))
    assert [frame.getpixel((0, 0)) for frame in capped.frames] == [COLOURS[0], COLOURS[3], COLOURS[0], COLOURS[3]]
    assert capped.fps == pytest.approx(4 / 3)  # 4 frames over 3 s (qwen-vl-utils' sample_fps)


def test_a_corrupt_video_is_one_load_error():
    data = colour_clip(COLOURS, fps=4)
    with pytest.raises(ImageLoadError, match="cannot load video 'bad.mkv': corrupt video"):
        decode_video("bad.mkv", data[:40], VideoSampling())
    with pytest.raises(ImageLoadError, match="no video stream|corrupt video"):
        decode_video("text.mkv", b"not a video at all" * 10, VideoSampling())


def _hf_patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' Qwen2VLVideoProcessor.patchify (5.24) for one video [T, C, H, W], transcribed."""
    videos = frames[None]
    batch, count, channel, height, width = videos.shape
    if pad := -count % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        count += pad
    t, h, w = count // temporal, height // patch, width // patch
    patches = videos.view(batch, t, temporal, channel, h // merge, merge, patch, w // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(t * h * w, channel * temporal * patch * patch), [t, h, w]


def _videos(timed: bool = False, low: int = 56 * 56, high: int = 112 * 112) -> Qwen2VLVideos:
    image = SimpleNamespace(patch_size=14, merge_size=2, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    config = SimpleNamespace(video_token_id=7, vision_config=SimpleNamespace(temporal_patch_size=2, in_channels=3))
    section = SimpleNamespace(path="/nonexistent", video_min_pixels=low, video_max_pixels=high)
    return Qwen2VLVideos(image, config, section, timed)


def test_video_patches_have_transformers_layout_grid_and_token_count():
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)) for _ in range(5)]
    videos = _videos(timed=True)
    tensors, tokens = videos([VideoClip(frames, fps=2.0)])
    pixels = np.stack([np.asarray(f, dtype=np.float32).transpose(2, 0, 1) / 255 for f in frames])
    pixels = (pixels - videos.mean) / videos.std  # 84x56 is already a multiple of 28 within the bounds: no resize
    expected, grid = _hf_patchify(torch.from_numpy(pixels), 14, 2, 2)
    assert tensors["video_grid_thw"].tolist() == [grid] == [[3, 4, 6]]  # 5 frames -> 6 (the last repeated)
    torch.testing.assert_close(tensors["pixel_values_videos"], expected)
    assert tokens == [3 * 4 * 6 // 4]
    assert tensors["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch at 2 fps


def test_video_frames_are_resized_into_the_pixel_bounds():
    frame = Image.new("RGB", (640, 480), (10, 200, 30))
    tensors, tokens = _videos(low=56 * 56, high=112 * 112)([VideoClip([frame] * 4, fps=2.0)])
    t, h, w = tensors["video_grid_thw"][0].tolist()
    assert t == 2 and h * w * 14 * 14 <= 112 * 112 and h % 2 == w % 2 == 0 and w > h
    assert tokens == [t * h * w // 4]
    assert "second_per_grid_ts" not in tensors  # Qwen2-VL's positions take no frame times


def test_the_clip_writer_is_lossless():
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    clip = decode_video("x", encode_clip(frames, fps=3), VideoSampling(fps=3, min_frames=1, max_frames=8))
    assert len(clip.frames) == 2  # 3 frames -> a multiple of the temporal patch
    assert all(np.array_equal(np.asarray(decoded), frame) for decoded, frame in zip(clip.frames, frames))


def test_a_frame_limit_below_the_temporal_patch_still_gives_one_patch():
    from silkie.data.video import VideoSampling, sample_indices

    assert sample_indices(300, 30, VideoSampling(min_frames=1, max_frames=1, frame_multiple=2)) == [0, 150]
    assert sample_indices(1, 30, VideoSampling(frame_multiple=2)) == [0]  # shorter than a patch: every frame


def test_pairs_with_videos_and_no_pyav_stop_before_training(monkeypatch):
    import importlib.util

    from silkie.data.build import check_video_decoder
    from silkie.data.pairs import PreferencePair
    from silkie.errors import InputError

    pairs = [PreferencePair("p1", "Q", (), "a", "b", 1.0, 0.0), PreferencePair("p2", "Q", (), "a", "b", 1.0, 0.0,
                                                                                ("clip.mp4",))]  # fmt: skip
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    with pytest.raises(InputError, match=r"1 pairs hold videos \(the first: p2: clip.mp4\); .* pip install av"):
        check_video_decoder(pairs)
    check_video_decoder(pairs[:1])  # images or text only: PyAV is not needed


def test_qwen3_vl_sizes_a_clip_s_frames_against_its_budget(tmp_path):
    """Qwen3-VL's release records a clip's pixel budget (4096..25165824 over all frames): a 64-frame 720p clip gets
    qwen-vl-utils' share per frame (393216 px, under the 768-token cap) and transformers' joint `smart_resize`:
    448x832 (364 tokens a frame); an 8-frame clip is held under the 768-token cap; recipe bounds are per frame."""
    import json

    from silkie.models.hf_vlm.qwen3_vl import Qwen3VLVideos

    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 4096, "longest_edge": 25165824}})
    )
    processor = SimpleNamespace(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    config = SimpleNamespace(vision_config=SimpleNamespace(temporal_patch_size=2, in_channels=3), video_token_id=9,
                             vision_start_token_id=7, vision_end_token_id=8)  # fmt: skip
    section = SimpleNamespace(path=str(tmp_path), video_min_pixels=None, video_max_pixels=None)
    tokenizer = lambda text, add_special_tokens: {"input_ids": [ord(c) for c in text]}  # noqa: E731
    videos = Qwen3VLVideos(processor, config, section, tokenizer)
    frame = Image.new("RGB", (1280, 720))
    assert videos.frame_size(VideoClip([frame] * 64, fps=2.0)) == (448, 832)
    assert videos.frame_size(VideoClip([frame] * 8, fps=2.0)) == (640, 1152)  # 720 tokens: under the cap of 768
    bounded = SimpleNamespace(path=str(tmp_path), video_min_pixels=None, video_max_pixels=64 * 64)
    assert Qwen3VLVideos(processor, config, bounded, tokenizer).frame_size(VideoClip([frame] * 64, 2.0)) == (32, 64)
    _, (layout,) = videos([VideoClip([Image.new("RGB", (64, 64))] * 3, fps=2.0, times=(0.0, 0.5, 3.0))])
    stamps = "".join(chr(i) if i > 9 else "|" for i in layout).split("|")  # frames at 0 0.5 | 3 (3 repeated)
    assert [s for s in stamps if s] == ["<0.2 seconds>", "<3.0 seconds>"]


def test_qwen3_vl_samples_first_to_last_and_keeps_each_frame_s_time():
    """Qwen3-VL's sampler: int(total / native x fps) frames spread first to last (transformers'
    `Qwen3VLVideoProcessor.sample_frames`: linspace(0, total - 1, n).round()); each frame keeps its source time, which
    the `<t seconds>` text is made of."""
    data = colour_clip(COLOURS * 2, size=(32, 24), fps=4)  # 12 frames = 3 s
    sampling = VideoSampling(fps=2, min_frames=4, max_frames=64, frame_multiple=2, spread="linspace")
    expected = np.linspace(0, 11, 6).round().astype(int).tolist()
    assert sample_indices(12, 4.0, sampling) == expected == [0, 2, 4, 7, 9, 11]
    clip = decode_video("v.mkv", data, sampling)
    assert [frame.getpixel((5, 5)) for frame in clip.frames] == [COLOURS[i % 6] for i in expected]
    assert clip.times == tuple(index / 4 for index in expected) and clip.frame_times()[3] == 1.75
    assert sampling.fingerprint() != VideoSampling(fps=2, min_frames=4, max_frames=64).fingerprint()
    assert sample_indices(12, 4.0, VideoSampling(fps=0.5, min_frames=4, spread="linspace")) == [0, 4, 7, 11]
