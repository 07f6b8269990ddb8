"""The annotation folder: its instructions, the images copied in, and the append-only record files every stage
resumes from (a line is written whole and flushed per batch, so a kill loses at most the batch in flight)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silkie.tools.cli import ToolError

log = logging.getLogger(__name__)

INSTRUCTIONS = "instructions.jsonl"
ANSWERS = "answers.jsonl"
ANSWER_FAILURES = "answer_failures.jsonl"
RATINGS = "ratings.jsonl"
FAILURES = "judge_failures.jsonl"
USAGE = "judge_usage.json"
IMAGES = "images"


@dataclass(frozen=True)
class Instruction:
    """One instruction to answer: its id, text and the image file copied into the folder."""

    id: str
    prompt: str
    image: str  # relative to the annotation folder


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of an append-only file; a torn last line (a kill mid-write) is skipped, any other bad line is a
    `ToolError` naming the file and line."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the line being written when the process died
                return
            raise ToolError(f"{path}:{number}: not a JSON record ({err.msg})") from err


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold `path`.lock while one process appends to `path` (a shard file); `ToolError` when another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ToolError(f"{path} is being written by another process (a shard running now)") from None
        yield


def being_written(path: Path) -> bool:
    """Whether a live process holds `path`'s writer lock."""
    if not Path(f"{path}.lock").is_file():
        return False
    with open(f"{path}.lock") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


class AppendLog:
    """An append-only jsonl file: `write` a batch of records, flushed and synced before it returns."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes() if path.is_file() else b""
        if data and not data.endswith(b"\n"):  # a torn last line (a kill mid-write): cut it, it is redone
            with path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append the records, one JSON line each, durably."""
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not text:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def _one_picture(raw: dict, where: str) -> str | None:
    """The instruction's picture (`image`, `img_path`, or an `images` list of one); a `ToolError` for several
    pictures or a video, which the rubric's one-image request cannot show the judge."""
    pictures = raw.get("images")
    if isinstance(pictures, list) and len(pictures) == 1 and not (raw.get("image") or raw.get("img_path")):
        return pictures[0]
    if pictures or raw.get("videos") or raw.get("video"):
        raise ToolError(
            f"{where}: an instruction to annotate has one picture (`image`); several `images` or a video are taken "
            "by training (data.source: preference), not by the judge's one-image request"
        )
    return raw.get("image") or raw.get("img_path")


def import_instructions(source: Path, images: Path, out: Path, limit: int | None = None) -> list[Instruction]:
    """Read `source` (jsonl rows `{"id", "prompt" | "instruction", "image"?}`; the image path is relative to `images`,
    default `merged_images/<id>.jpg` as in VLFeedback), copy each image into `out/images/`, and write
    `out/instructions.jsonl` (the first `limit` rows when given). Already imported (a resumed run): the folder's
    copy is used."""
    from silkie.data.images import ImageLoadError, image_key, open_image_store

    done = out / INSTRUCTIONS
    if done.is_file():
        imported = [Instruction(**row) for row in read_jsonl(done)]
        if limit is not None and limit != len(imported):
            log.warning(
                f"{out} already holds its {len(imported)} instructions (fixed at its first run): --limit {limit} is "
                "ignored; use a new --out folder for another set"
            )
        return imported
    if not source.is_file():
        raise ToolError(f"instructions file not found: {source}")
    store = open_image_store(images)
    rows, seen = [], set()
    for number, raw in enumerate(read_jsonl(source), 1):
        if limit is not None and len(rows) >= limit:
            break
        where = f"{source}: row {number}"
        if not isinstance(raw, dict):
            raise ToolError(f"{where}: expected a JSON object")
        row_id, prompt = raw.get("id"), raw.get("prompt", raw.get("instruction"))
        if not isinstance(row_id, (str, int)) or not isinstance(prompt, str) or not prompt.strip():
            raise ToolError(f"{where}: needs an `id` and a non-empty `prompt` (or `instruction`)")
        row_id = str(row_id)
        if not row_id.strip() or any(c == "\\" or ord(c) < 32 for c in row_id):
            raise ToolError(f"{where}: id {row_id!r} must be non-empty, without backslashes or control characters")
        if row_id in seen:
            raise ToolError(f"{where}: id {row_id!r} given twice")
        seen.add(row_id)
        key = image_key(row_id=row_id, img_path=_one_picture(raw, where))
        try:
            data = store.read_bytes(key)
        except ImageLoadError as err:
            raise ToolError(f"{where}: {err}") from err
        target = Path(IMAGES) / f"{number:07d}{Path(key).suffix.lower() or '.jpg'}"  # ids may not be file names
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        (out / target).write_bytes(data)
        rows.append(Instruction(row_id, prompt, target.as_posix()))
    if not rows:
        raise ToolError(f"{source}: no instructions")
    staging = done.with_suffix(".tmp")
    staging.write_text("".join(json.dumps(row.__dict__, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    staging.replace(done)  # written whole: its presence means the import finished
    return rows
