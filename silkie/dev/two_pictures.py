"""A synthetic multi-image preference set: two pictures per pair, the preferred answer says which has more circles.

Each picture shows 1-4 circles of one colour (colours drawn independently of the counts). The two counts differ;
every ordered pair of counts occurs equally often, so "the first" is right in exactly half of the pairs and the
text alone cannot tell: the preference is learned only by comparing the two pictures. Some prompts place the
pictures with `<image>` markers, the others let them go first. Written as a generic preference file
(`images: [...]`, `data.source: preference`) and a zip of the pictures.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from itertools import permutations
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ((220, 30, 30), (30, 160, 40), (30, 60, 220), (235, 160, 20))
SIDE, RADIUS = 56, 11
PROMPTS = (
    "Which picture has more circles, the first or the second?",
    "Compare <image> and <image>: which one shows more circles?",
    "Look at both pictures. Which of them has more circles?",
    "<image>\n<image>\nWhich of these two pictures contains more circles?",
)
ANSWERS = ("The {} picture has more circles.", "The {} one shows more circles.")
PAIRS_NAME, ZIP_NAME = "two_pictures.jsonl", "two_pictures.zip"
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def draw_circles(count: int, colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """`count` (1-4) circles, one in each of `count` random quarters of the picture, jittered."""
    image = Image.new("RGB", (SIDE, SIDE), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    half = SIDE // 2
    for quarter in rng.sample(range(4), count):
        x0, y0 = (quarter % 2) * half, (quarter // 2) * half
        cx = x0 + rng.randint(RADIUS + 1, half - RADIUS - 1)
        cy = y0 + rng.randint(RADIUS + 1, half - RADIUS - 1)
        draw.ellipse((cx - RADIUS, cy - RADIUS, cx + RADIUS, cy + RADIUS), fill=colour)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_two_picture_pairs(out_dir: str | Path, n: int = 960, seed: int = 0) -> dict[str, int | str]:
    """Write `two_pictures.jsonl` (n rows) and `two_pictures.zip` under `out_dir`; returns a summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    orders = list(permutations(range(1, 5), 2))  # 12 ordered (first, second) counts, half with first > second
    rows, first_wins = [], 0
    with zipfile.ZipFile(out / ZIP_NAME, "w", zipfile.ZIP_STORED) as archive:
        for index in range(n):
            counts = orders[index % len(orders)]
            keys = [f"two/{index:05d}-{k}.png" for k in (1, 2)]
            for key, count in zip(keys, counts):
                member = zipfile.ZipInfo(key, date_time=ZIP_DATE)
                archive.writestr(member, _png(draw_circles(count, rng.choice(COLOURS), rng)))
            winner, loser = ("first", "second") if counts[0] > counts[1] else ("second", "first")
            first_wins += winner == "first"
            template = ANSWERS[rng.randrange(len(ANSWERS))]
            rows.append(
                {
                    "id": f"two-{index:05d}",
                    "prompt": PROMPTS[index // len(orders) % len(PROMPTS)],
                    "images": keys,
                    "chosen": template.format(winner),
                    "rejected": template.format(loser),
                }
            )
    rng.shuffle(rows)
    with (out / PAIRS_NAME).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return {"rows": n, "first_wins": first_wins, "pairs": str(out / PAIRS_NAME), "images": str(out / ZIP_NAME)}
