"""Video frames for training: decoded with PyAV (FFmpeg), sampled as Qwen2-VL samples them.

`sample_indices` follows transformers' `Qwen2VLVideoProcessor.sample_frames` with `fps`: `total / native fps x fps`
frames, within `min_frames`..`max_frames` (and the clip's own count), a multiple of the temporal patch, spread
uniformly (`arange(0, total, total / n)`); Qwen3-VL's (`spread="linspace"`): `int(total / native fps x fps)` frames
within the same bounds, first to last (`linspace(0, total - 1, n).round()`); InternVL's (`spread="middle"`): the
arange count, each the middle of its segment (InternVL's `get_index`: `int(seg / 2 + round(seg x i))`, seg =
(total - 1) / n). The rate
the frames were sampled at goes with them (Qwen2.5-VL's temporal positions use it, as qwen-vl-utils computes it),
and each frame's time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from silkie.data.images import ImageLoadError
from silkie.models.family import VideoClip

VIDEO_DECODE_VERSION = "pyav-rgb24-v1"  # part of the reference cache's key, like the image decode rules


@dataclass(frozen=True)
class VideoSampling:
    """How many frames a video gives (the recipe's `data.video_fps`, `video_min_frames`, `video_max_frames`)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 64
    frame_multiple: int = 2  # the family's temporal patch: a sample count is a multiple of it
    spread: str = "arange"  # how frames are spread: Qwen2-VL's "arange", Qwen3-VL's "linspace", InternVL's "middle"

    def fingerprint(self) -> str:
        """The settings that decide which frames a video gives."""
        key = f"{VIDEO_DECODE_VERSION}:{self.fps}:{self.min_frames}:{self.max_frames}:{self.frame_multiple}"
        return key if self.spread == "arange" else f"{key}:{self.spread}"


def sample_indices(total: int, native_fps: float, sampling: VideoSampling) -> list[int]:
    """Indices of the frames to keep out of `total` frames recorded at `native_fps`."""
    if total <= 0:
        return []
    if sampling.spread == "linspace":  # transformers' Qwen3VLVideoProcessor.sample_frames with fps
        count = min(max(int(total / native_fps * sampling.fps), sampling.min_frames), sampling.max_frames, total)
        return [int(index) for index in np.linspace(0, total - 1, count).round()]
    multiple = max(1, sampling.frame_multiple)
    most = math.floor(min(sampling.max_frames, total) / multiple) * multiple
    wanted = total / native_fps * sampling.fps
    if total < multiple:  # shorter than one temporal patch: every frame (the processor repeats the last one)
        return list(range(total))
    count = math.floor(min(max(wanted, sampling.min_frames), most, total) / multiple) * multiple
    count = max(count, multiple)  # at least one temporal patch, even with max_frames below it
    if sampling.spread == "middle":  # InternVL's get_index: the middles of `count` segments of frames 0..total-1
        segment = (total - 1) / count
        return [int(segment / 2 + np.round(segment * i)) for i in range(count)]
    step = total / count
    return [int(i * step) for i in range(count)]


def decode_video(key: str, data: bytes, sampling: VideoSampling) -> VideoClip:
    """The sampled frames of an encoded video as RGB images and their rate; `ImageLoadError` naming `key` when it
    cannot be decoded."""
    try:
        import av
    except ImportError as exc:  # a core requirement; a stripped environment still gets one line
        raise ImageLoadError(key, "videos need PyAV (pip install av)", "video") from exc
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ImageLoadError(key, "no video stream", "video")
            stream = container.streams.video[0]
            native = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames or _count_packets(data)
            if native <= 0 or total <= 0:
                raise ImageLoadError(key, "the video has no frame rate or no frames", "video")
            keep = sample_indices(total, native, sampling)
            wanted, frames = set(keep), {}
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted:
                    frames[number] = frame.to_image().convert("RGB")
                if number >= keep[-1]:
                    break
    except ImageLoadError:
        raise
    except Exception as exc:  # PyAV raises its own error types for corrupt data
        raise ImageLoadError(key, f"corrupt video ({type(exc).__name__}: {exc})", "video") from exc
    if not frames:
        raise ImageLoadError(key, "no frame could be decoded", "video")
    # a header that promised more frames than the stream holds: the last decoded frame stands in for the rest
    ordered, held = [], frames[min(frames)]
    for index in keep:
        held = frames.get(index, held)
        ordered.append(held)
    times = tuple(index / native for index in keep)  # as transformers' Qwen3-VL processor: frame index / native fps
    return VideoClip(frames=ordered, fps=len(keep) / total * native, times=times)  # fps: qwen-vl-utils' sample_fps


def _count_packets(data: bytes) -> int:
    """Frames of a container whose header gives no count: its video packets (one frame each)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def blank_video(frames: int, size: tuple[int, int] = (64, 64)) -> VideoClip:
    """A grey stand-in for a video that failed to load (its pair is weighted 0)."""
    return VideoClip(frames=[Image.new("RGB", size, (128, 128, 128)) for _ in range(max(1, frames))], fps=1.0)
