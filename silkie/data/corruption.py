"""A corrupted copy of a pair's image for the vision-aware objectives and diagnostics: seeded by the data seed and
the image's key, so it is the same picture every epoch, on every rank and after a resume (the reference
log-probs of the corrupted view can be cached like the others). The copy keeps the original's size, so every
family's processor gives it the same number of image tokens."""

from __future__ import annotations

import hashlib
import random

from PIL import Image

from silkie.config.names import IMAGE_CORRUPTIONS

CORRUPTION_VERSION = "v1"  # part of the reference cache key: a change of these rules invalidates cached views
CROP_AREA = (0.01, 0.2)  # mDPO: a random crop of 0-20% of the image (not less than 1%: some picture remains)
MASK_GRID, MASK_SHARE = 8, 0.8  # `mask`: 80% of an 8 x 8 grid of cells blacked out
NOISE_SHARE = 0.8  # `noise`: 80% uniform noise blended over the image
GREY = (128, 128, 128)


def _rng(kind: str, seed: int, key: str) -> random.Random:
    digest = hashlib.sha256(f"{CORRUPTION_VERSION}:{kind}:{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def corrupt_image(image: Image.Image, kind: str, seed: int, key: str) -> Image.Image:
    """The `kind` corruption (`crop`, `mask`, `noise`, `blank`) of `image`, decided by (`seed`, `key`), in RGB at
    the original size."""
    if kind not in IMAGE_CORRUPTIONS:
        raise ValueError(f"unknown image corruption {kind!r}; expected one of {', '.join(IMAGE_CORRUPTIONS)}")
    image = image.convert("RGB")
    width, height = image.size
    rng = _rng(kind, seed, key)
    if kind == "blank":
        return Image.new("RGB", image.size, GREY)
    if kind == "crop":
        share = rng.uniform(*CROP_AREA)
        side_w, side_h = max(1, round(width * share**0.5)), max(1, round(height * share**0.5))
        left, top = rng.randint(0, width - side_w), rng.randint(0, height - side_h)
        return image.crop((left, top, left + side_w, top + side_h)).resize(image.size, Image.BICUBIC)
    if kind == "mask":
        out = image.copy()
        cells = [(i, j) for i in range(MASK_GRID) for j in range(MASK_GRID)]
        for i, j in rng.sample(cells, round(MASK_SHARE * len(cells))):
            box = (i * width // MASK_GRID, j * height // MASK_GRID)
            end = ((i + 1) * width // MASK_GRID, (j + 1) * height // MASK_GRID)
            out.paste((0, 0, 0), (*box, *end))
        return out
    noise = Image.frombytes("RGB", image.size, rng.randbytes(width * height * 3))
    return Image.blend(image, noise, NOISE_SHARE)
