"""Small generated video clips for tests and demos: lossless (FFV1 in Matroska), so decoded pixels are exact."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def encode_clip(frames: Sequence[np.ndarray], fps: int = 4) -> bytes:
    """Encode RGB frames (uint8 [H, W, 3], one size, even sides) as an FFV1 Matroska clip at `fps`."""
    import av

    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def colour_clip(colours: Sequence[tuple[int, int, int]], size: tuple[int, int] = (32, 32), fps: int = 4) -> bytes:
    """A clip with one flat colour per frame."""
    frames = [np.tile(np.asarray(colour, dtype=np.uint8), (size[1], size[0], 1)) for colour in colours]
    return encode_clip(frames, fps)


def noise_clip(frames: int, size: tuple[int, int] = (32, 32), fps: int = 4, seed: int = 0) -> bytes:
    """A clip of seeded random frames."""
    rng = np.random.default_rng(seed)
    return encode_clip([rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(frames)], fps)
