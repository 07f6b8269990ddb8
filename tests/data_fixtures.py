"""Builders of hand-written VLFeedback / preference rows and image files for the data tests."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image

ASPECTS = ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")


def completion(response: str, ratings: tuple, model: str = "model-x") -> dict[str, Any]:
    """A release-format completion; `ratings` = (Helpfulness, Ethical, Visual Faithfulness), any values."""
    annotations = {aspect: {"Rating": str(r), "Rationale": "because"} for aspect, r in zip(ASPECTS, ratings)}
    return {"model": model, "response": response, "annotations": annotations}


def feedback_row(row_id: str, ratings: list[tuple], prompt: str = "Describe the image.", **extra: Any) -> dict:
    """A release-format row with one completion per ratings triple; responses are `answer <i> of <id>`."""
    completions = [completion(f"answer {i} of {row_id}", r, model=f"model-{i}") for i, r in enumerate(ratings)]
    return {
        "id": row_id,
        "prompt": prompt,
        "models": [c["model"] for c in completions],
        "completions": completions,
        **extra,
    }


def clean_row(row_id: str) -> dict:
    """Four answers with distinct mean ratings 5 > 4 > 3 > 2 (6 usable pairs)."""
    return feedback_row(row_id, [(5, 5, 5), (4, 4, 4), (3, 3, 3), (2, 2, 2)])


def to_columnar(row: dict) -> dict:
    """The hub layout: `completions` as a dict of lists."""
    completions = row["completions"]
    columnar = {key: [c[key] for c in completions] for key in ("model", "response", "annotations")}
    return {**row, "completions": columnar}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows (dicts, or raw strings written verbatim) as JSON lines."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def synthetic_instructions(root: Path, n: int, seed: int) -> list[dict]:
    """A synthetic release in `root/vlf` and its rows as `{id, prompt}` instructions (for `annotate sample`)."""
    from silkie.dev.synthetic import write_synthetic_vlfeedback

    write_synthetic_vlfeedback(root / "vlf", n=n, seed=seed)
    rows = [json.loads(line) for line in (root / "vlf" / "vlfeedback_80k.jsonl").read_text().splitlines()]
    return [{"id": r["id"], "prompt": r["prompt"]} for r in rows]


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    """A small solid-colour JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    """A zip holding `members` (name -> bytes)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


VOCAB_CORPUS = [
    "There are two red circles in the picture. The image shows one blue square.\n",
    "Describe the image. What is in the picture? What do you see in this image?\n",
    "You are a helpful assistant. system user assistant Picture 1: merged_images/ .jpg\n",
]


def write_tiny_vocab(directory: Path) -> Path:
    """Train a ~300-rank BPE vocabulary offline and write `qwen.tiktoken` into `directory`."""
    from silkie.models.qwen_vl.tokenization import VOCAB_FILE, train_bpe_ranks, write_tiktoken_ranks

    directory.mkdir(parents=True, exist_ok=True)
    write_tiktoken_ranks(train_bpe_ranks(VOCAB_CORPUS * 20, 320), directory / VOCAB_FILE)
    return directory
