"""A tiny synthetic VLFeedback (same files and format as the release) whose preferences need the image.

Each image shows 1-3 shapes of one colour and one kind. Prompts are generic and drawn independently of
the image. Two answers describe the image correctly (rated high), two name a wrong colour, shape or
count (rated low). Scenes cycle through all combinations and wrong answers are balanced greedily, so
every answer string is about as often correct (chosen) as wrong (rejected): text alone cannot tell.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from silkie.data.images import IMAGE_PREFIX, IMAGE_SUFFIX

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PROMPTS = (
    "What is in the picture?",
    "Describe the image.",
    "What do you see in this image?",
    "Describe what is shown in the picture.",
)
MODELS = ("gpt-4v", "llava-v1.5-13b", "qwen-vl-chat", "instructblip-vicuna-13b")
ASPECT_ORDER = ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")
# (Helpfulness, Ethical Considerations, Visual Faithfulness); two high and two low triples tie on the mean.
HIGH_RATINGS = (("5", "5", "5"), ("4", "5", "5"), ("5", "4", "5"))
LOW_RATINGS = (("2", "5", "1"), ("1", "5", "2"), ("1", "4", "1"))
BAD_KINDS = ("missing_image", "non_numeric_rating", "empty_answer", "missing_field")
JSONL_NAME = "vlfeedback_80k.jsonl"
ZIP_NAME = "merged_images.zip"
META_NAME = "synthetic_meta.jsonl"
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` shapes of one `shape` and `colour`."""

    colour: str
    shape: str
    count: int


ALL_SCENES = tuple(Scene(c, s, n) for c, s, n in product(COLOURS, SHAPES, COUNTS))


def describe(scene: Scene, template: int) -> str:
    """The answer text for `scene` in one of two phrasings (template 0 or 1)."""
    noun = scene.shape if scene.count == 1 else f"{scene.shape}s"
    word = NUMBER_WORDS[scene.count]
    if template == 0:
        verb = "is" if scene.count == 1 else "are"
        return f"There {verb} {word} {scene.colour} {noun} in the picture."
    return f"The image shows {word} {scene.colour} {noun}."


def neighbours(scene: Scene) -> list[Scene]:
    """Scenes that differ from `scene` in exactly one attribute (the wrong descriptions)."""
    out = [Scene(c, scene.shape, scene.count) for c in COLOURS if c != scene.colour]
    out += [Scene(scene.colour, s, scene.count) for s in SHAPES if s != scene.shape]
    out += [Scene(scene.colour, scene.shape, n) for n in COUNTS if n != scene.count]
    return out


def draw_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw `scene` on a light background, one shape per distinct cell of a 2x2 grid."""
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = size // 2
    base = COLOURS[scene.colour]
    for index in rng.sample(range(4), scene.count):
        extent = rng.randint(int(cell * 0.6), int(cell * 0.8))
        left = (index % 2) * cell + rng.randint(1, cell - extent - 1)
        top = (index // 2) * cell + rng.randint(1, cell - extent - 1)
        box = (left, top, left + extent, top + extent)
        fill = tuple(max(0, min(255, value + rng.randint(-12, 12))) for value in base)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
    return image


def _completion(model: str, response: str, ratings: tuple[str, str, str], correct: bool) -> dict[str, Any]:
    why = "matches the image" if correct else "does not match the colour, shape or count in the image"
    annotations = {
        aspect: {"Rating": rating, "Rationale": f"The answer {why}."} for aspect, rating in zip(ASPECT_ORDER, ratings)
    }
    return {"model": model, "response": response, "annotations": annotations}


class _WrongBalancer:
    """Picks wrong descriptions so every (template, scene) string is used as wrong about equally often."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts: dict[tuple[int, Scene], int] = {}

    def pick(self, scene: Scene, template: int) -> Scene:
        options = neighbours(scene)
        lowest = min(self.counts.get((template, option), 0) for option in options)
        best = [option for option in options if self.counts.get((template, option), 0) == lowest]
        choice = self.rng.choice(best)
        self.counts[(template, choice)] = lowest + 1
        return choice


def _corrupt(row: dict[str, Any], kind: str, rng: random.Random) -> None:
    victim = rng.randrange(len(row["completions"]))
    if kind == "non_numeric_rating":
        row["completions"][victim]["annotations"]["Helpfulness"]["Rating"] = "N/A"
    elif kind == "empty_answer":
        row["completions"][victim]["response"] = ""
    elif kind == "missing_field":
        del row["prompt"]


def generate_rows(n: int, seed: int = 0, bad_rows: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`n` clean rows plus `bad_rows` broken ones, as (release-format row, metadata) in file order."""
    if n < 1 or bad_rows < 0:
        raise ValueError(f"need n >= 1 and bad_rows >= 0, got n={n}, bad_rows={bad_rows}")
    rng = random.Random(seed)
    balancer = _WrongBalancer(rng)
    total = n + bad_rows
    bad_at = dict(zip(sorted(rng.sample(range(total), bad_rows)), (BAD_KINDS * bad_rows)[:bad_rows]))
    scenes: list[Scene] = []
    out = []
    for index in range(total):
        if not scenes:
            scenes = rng.sample(ALL_SCENES, len(ALL_SCENES))
        scene = scenes.pop()
        wrong = [balancer.pick(scene, template) for template in (0, 1)]
        correct_text = [describe(scene, template) for template in (0, 1)]
        wrong_text = [describe(other, template) for template, other in enumerate(wrong)]
        models = rng.sample(MODELS, len(MODELS))
        answers = [(text, rng.choice(HIGH_RATINGS), True) for text in correct_text]
        answers += [(text, rng.choice(LOW_RATINGS), False) for text in wrong_text]
        rng.shuffle(answers)
        row_id = f"synthetic-{index:06d}"
        row = {
            "id": row_id,
            "prompt": rng.choice(PROMPTS),
            "models": models,
            "completions": [_completion(m, *answer) for m, answer in zip(models, answers)],
        }
        kind = bad_at.get(index)
        if kind is not None:
            _corrupt(row, kind, rng)
        meta = {"id": row_id, **asdict(scene), "correct": correct_text, "wrong": wrong_text, "bad": kind}
        out.append((row, meta))
    return out


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_synthetic_vlfeedback(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 56, bad_rows: int = 0
) -> dict[str, Any]:
    """Write `vlfeedback_80k.jsonl`, `merged_images.zip` (+ `synthetic_meta.jsonl`) under `out_dir`."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_rows(n, seed=seed, bad_rows=bad_rows)
    draw_rng = random.Random(f"draw:{seed}")
    with (
        (out / JSONL_NAME).open("w", encoding="utf-8") as jsonl,
        (out / META_NAME).open("w", encoding="utf-8") as meta_file,
        zipfile.ZipFile(out / ZIP_NAME, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        for row, meta in rows:
            jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            meta_file.write(json.dumps(meta) + "\n")
            image = draw_scene(Scene(meta["colour"], meta["shape"], meta["count"]), image_size, draw_rng)
            if meta["bad"] == "missing_image":
                continue
            info = zipfile.ZipInfo(f"{IMAGE_PREFIX}{row['id']}{IMAGE_SUFFIX}", date_time=ZIP_DATE)
            archive.writestr(info, _jpeg_bytes(image))
    bad_counts = {kind: sum(1 for _, meta in rows if meta["bad"] == kind) for kind in BAD_KINDS}
    return {
        "jsonl": str(out / JSONL_NAME),
        "zip": str(out / ZIP_NAME),
        "meta": str(out / META_NAME),
        "rows": len(rows),
        "clean_rows": n,
        "bad_rows": {kind: count for kind, count in bad_counts.items() if count},
    }


def load_metadata(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The generator's per-row metadata (scene, correct/wrong answers, bad kind) keyed by row id."""
    path = Path(out_dir) / META_NAME
    with path.open("r", encoding="utf-8") as handle:
        return {meta["id"]: meta for meta in map(json.loads, handle)}
