"""Qwen-VL-Chat image preprocessing with PIL and torch only (no torchvision).

Matches the original `VisionTransformer.encode`: RGB conversion (alpha dropped),
resize to exactly `image_size` x `image_size` with PIL bicubic (no aspect keeping,
no crop), scale to [0, 1], normalize with the CLIP mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QWenVLImageProcessor:
    """Turns PIL images (or paths) into a `pixel_values` tensor [N, 3, S, S]."""

    def __init__(self, image_size: int = 448, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def preprocess_one(self, image: Image.Image | str | Path) -> torch.Tensor:
        """One image (PIL or path) -> float32 tensor [3, S, S]."""
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        else:
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        resized = image.resize(size, resample=Image.Resampling.BICUBIC)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        return (tensor - self.mean) / self.std

    def fingerprint(self) -> str:
        """The settings that decide the pixels (size, mean, std)."""
        return f"qwen_vl {self.image_size} {self.mean.flatten().tolist()} {self.std.flatten().tolist()}"

    def __call__(self, images: Sequence[Image.Image | str | Path] | Image.Image) -> torch.Tensor:
        """A list of images -> `pixel_values` [N, 3, S, S] (float32)."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        if len(images) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.preprocess_one(image) for image in images])
