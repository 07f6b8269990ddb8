"""The annotation folder as a VLFeedback release: `release/vlfeedback_80k.jsonl` (one row per rated instruction:
id, prompt, models, completions with their 3-aspect annotations) and `release/merged_images.zip`
(`merged_images/<id>.jpg`), read by `data.source: vlfeedback` and `silkie prepare` as the published release is;
plus `summary.json` (answers, ratings, rating histogram per aspect, judge failures, tokens and cost)."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from silkie.data.images import IMAGE_PREFIX, IMAGE_SUFFIX
from silkie.data.sources import ASPECTS
from silkie.tools.annotate.files import FAILURES, RATINGS, USAGE, Instruction, read_jsonl
from silkie.tools.annotate.judge import answers_by_instruction

RELEASE = "release"
JSONL_NAME, ZIP_NAME, SUMMARY = "vlfeedback_80k.jsonl", "merged_images.zip", "summary.json"
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def release_rows(instructions: Sequence[Instruction], out: Path) -> list[dict[str, Any]]:
    """One VLFeedback row per rated instruction, in instruction order."""
    grouped = answers_by_instruction(out)
    ratings = {record["id"]: record for record in read_jsonl(out / RATINGS)}
    rows = []
    for row in instructions:
        rated = ratings.get(row.id)
        if rated is None:
            continue
        answers = {answer["model"]: answer["response"] for answer in grouped.get(row.id, [])}
        completions = [
            {"model": model, "response": answers[model], "annotations": annotations}
            for model, annotations in zip(rated["models"], rated["annotations"])
        ]
        rows.append({"id": row.id, "prompt": row.prompt, "models": rated["models"], "completions": completions})
    return rows


def write_release(instructions: Sequence[Instruction], out: Path) -> dict[str, Any]:
    """Write the release and the summary; returns the summary."""
    rows = release_rows(instructions, out)
    target = out / RELEASE
    target.mkdir(exist_ok=True)
    images = {row.id: row.image for row in instructions}
    staging = target / (JSONL_NAME + ".tmp")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    with zipfile.ZipFile(target / (ZIP_NAME + ".tmp"), "w", zipfile.ZIP_STORED) as archive:
        for row in rows:  # the picture's own bytes (decoders read the content, not the name)
            info = zipfile.ZipInfo(f"{IMAGE_PREFIX}{row['id']}{IMAGE_SUFFIX}", date_time=ZIP_DATE)
            archive.writestr(info, (out / images[row["id"]]).read_bytes())
    staging.replace(target / JSONL_NAME)
    (target / (ZIP_NAME + ".tmp")).replace(target / ZIP_NAME)
    summary = summarize(instructions, rows, out)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(instructions: Sequence[Instruction], rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Counts of the folder: instructions, answers (and empty ones, which the judge is not sent), rated, rating
    histogram per aspect, failures, usage."""
    histogram = {aspect: Counter() for aspect in ASPECTS}
    for row in rows:
        for completion in row["completions"]:
            for aspect in ASPECTS:
                histogram[aspect][completion["annotations"][aspect]["Rating"]] += 1
    rated = {row["id"] for row in rows}
    failures = {r["id"]: r["reason"].split(":")[0] for r in read_jsonl(out / FAILURES) if r["id"] not in rated}
    usage = json.loads((out / USAGE).read_text()) if (out / USAGE).is_file() else {}
    grouped = answers_by_instruction(out)
    return {
        "instructions": len(instructions),
        "answers": sum(len(v) for v in grouped.values()),
        "empty_answers": sum(not answer["response"].strip() for answers in grouped.values() for answer in answers),
        "rated_instructions": len(rows),
        "rated_answers": sum(len(row["completions"]) for row in rows),
        "ratings": {aspect: {str(k): histogram[aspect].get(str(k), 0) for k in range(1, 6)} for aspect in ASPECTS},
        "judge_failures": dict(Counter(failures.values())),
        "judge_usage": usage,
        "release": {"jsonl": str(out / RELEASE / JSONL_NAME), "images": str(out / RELEASE / ZIP_NAME)},
    }
