"""Loaders that turn VLFeedback (release jsonl or hub) and generic preference files into normalized rows.

A malformed row never stops a load: it is skipped and counted under a reason
(`missing_field`, `wrong_type`, `bad_json`, `malformed_completions`, `too_few_completions`, `bad_encoding`),
with the first few offending ids kept for the report. A generic preference row may hold any number of images
(`image` or `images`, order kept) and videos (`video` or `videos`); a VLFeedback row has one image.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from silkie.data.embedded import EmbeddedMedia
from silkie.data.images import image_key
from silkie.data.preference_rows import PreferenceRow, normalize_preference_row
from silkie.data.records import is_saved_dataset, jsonl_records, preference_records
from silkie.data.row_error import RowError, require_field
from silkie.errors import InputError, MissingInputError

ASPECTS = ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")
MAX_EXAMPLE_IDS = 5
MAX_DETAIL = 120  # characters of a drop reason's first case in the one-line summary


@dataclass(frozen=True)
class Completion:
    """One answer of a VLFeedback row with its raw per-aspect ratings (strings, or None when absent)."""

    model: str
    response: str
    ratings: Mapping[str, str | None]


@dataclass(frozen=True)
class FeedbackRow:
    """A VLFeedback instruction: prompt, image key(s) (one in the release) and its rated completions."""

    id: str
    prompt: str
    images: tuple[str, ...]
    completions: tuple[Completion, ...]
    videos: tuple[str, ...] = ()


def prompt_key(item: Any) -> tuple:
    """The prompt a row or pair belongs to: its question and media, where a conversation's question is its first
    user turn, so that its pairs at later turns (which repeat the earlier ones) are one prompt with it. The split,
    `data.max_prompts` and the id checks go by it."""
    history = getattr(item, "history", ())
    return history[0][0] if history else item.prompt, item.images, item.videos


RowT = TypeVar("RowT")


@dataclass
class LoadedRows(Generic[RowT]):
    """The rows a loader kept, plus what it skipped and why (iterable like a list of rows)."""

    name: str
    rows: list[RowT] = field(default_factory=list)
    rows_seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)
    first_details: dict[str, str] = field(default_factory=dict)  # reason -> what was wrong with its first row
    first_columns: frozenset[str] = frozenset()  # the first row's columns (what kind of file it is)

    def skip(self, reason: str, row_id: str, detail: str = "") -> None:
        """Count one skipped row under `reason` (`detail`: e.g. the missing field)."""
        self.skipped[reason] += 1
        examples = self.skipped_ids.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLE_IDS:
            examples.append(row_id)
        if detail:
            self.first_details.setdefault(reason, detail)

    def __iter__(self) -> Iterator[RowT]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def _row_id(raw: Any, fallback: str) -> str:
    if isinstance(raw, Mapping) and isinstance(raw.get("id"), (str, int)) and not isinstance(raw.get("id"), bool):
        return str(raw["id"]) if str(raw["id"]).strip() else fallback
    return fallback


def _raw_rating(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("Rating")
    if value is None or isinstance(value, bool):
        return None
    return str(value).strip() if isinstance(value, (str, int, float)) else None


def _completion_dicts(raw: Any) -> list[Mapping[str, Any]]:
    """Completions as a list of dicts, from either the row layout or the hub's columnar layout."""
    if isinstance(raw, Mapping):
        columns = {key: value for key, value in raw.items() if value is not None}
        if "response" not in columns:
            raise RowError("missing_field", "completions.response")
        lengths = {len(value) for value in columns.values() if isinstance(value, list)}
        if len(lengths) != 1 or not all(isinstance(value, list) for value in columns.values()):
            raise RowError("malformed_completions", "columnar completions with unequal or non-list columns")
        count = lengths.pop()
        return [{key: value[index] for key, value in columns.items()} for index in range(count)]
    if isinstance(raw, list):
        if not all(isinstance(item, Mapping) for item in raw):
            raise RowError("wrong_type", "completions items must be objects")
        return list(raw)
    raise RowError("wrong_type", f"completions is {type(raw).__name__}")


def _completion(raw: Mapping[str, Any], index: int, models: Any) -> Completion:
    response = require_field(raw, "response", str)
    model = raw.get("model")
    if not isinstance(model, str) and isinstance(models, list) and index < len(models):
        model = models[index]
    annotations = raw.get("annotations")
    ratings: dict[str, str | None] = {}
    if isinstance(annotations, Mapping):
        ratings = {str(aspect): _raw_rating(value) for aspect, value in annotations.items()}
    return Completion(model=str(model) if model is not None else f"model_{index}", response=response, ratings=ratings)


def normalize_feedback_row(raw: Any) -> FeedbackRow:
    """One raw VLFeedback row (release or hub layout) -> `FeedbackRow`; raises `RowError` with a reason."""
    if not isinstance(raw, Mapping):
        raise RowError("wrong_type", f"row is {type(raw).__name__}")
    row_id = str(require_field(raw, "id", (str, int)))
    if not row_id.strip():  # it names the row's picture (merged_images/<id>.jpg) and its pairs
        raise RowError("missing_field", "id is empty")
    prompt = require_field(raw, "prompt", str)
    if "completions" not in raw or raw["completions"] is None:
        raise RowError("missing_field", "completions")
    models = raw.get("models")
    completions = tuple(
        _completion(item, index, models) for index, item in enumerate(_completion_dicts(raw["completions"]))
    )
    if len(completions) < 2:
        raise RowError("too_few_completions", f"{len(completions)} completion(s)")
    img_path = raw.get("img_path")
    image = image_key(row_id=row_id, img_path=img_path if isinstance(img_path, str) else None)
    return FeedbackRow(id=row_id, prompt=prompt, images=(image,), completions=completions)


def collect_rows(
    name: str,
    raw_rows: Iterable[Any],
    normalize: Any,
    media: EmbeddedMedia | None = None,
    keep: Callable[[Any], bool] | None = None,
) -> LoadedRows:
    """Normalize `raw_rows` with `normalize`, skipping and counting rows that raise `RowError`; `keep` leaves rows
    out uncounted (e.g. past `data.max_prompts`), and `media` writes the pictures of the rows kept."""
    loaded: LoadedRows = LoadedRows(name=name)
    for index, raw in enumerate(raw_rows):
        loaded.rows_seen += 1
        if index == 0 and isinstance(raw, Mapping):
            loaded.first_columns = frozenset(map(str, raw))
        if isinstance(raw, RowError):
            loaded.skip(raw.reason, raw.detail or f"row {index}", raw.problem)
            continue
        try:
            row = normalize(raw)
        except RowError as error:
            loaded.skip(error.reason, _row_id(raw, f"row {index}"), error.detail)
            row = None
        if row is None or (keep is not None and not keep(row)):
            if media is not None:
                media.discard()
            continue
        if media is not None:
            media.commit()
        loaded.rows.append(row)
    return loaded


def load_vlfeedback_jsonl(
    path: str | os.PathLike[str], keep: Callable[[Any], bool] | None = None
) -> LoadedRows[FeedbackRow]:
    """Load the release file `vlfeedback_80k.jsonl` into normalized rows (image key `merged_images/<id>.jpg`);
    `keep` (e.g. the first N prompts) selects rows."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"VLFeedback jsonl not found: {path}")
    return collect_rows(str(path), jsonl_records(path), normalize_feedback_row, keep=keep)


def load_vlfeedback_hf(
    name_or_dir: str | os.PathLike[str],
    split: str = "train",
    key: str = "data.path",
    keep: Callable[[Any], bool] | None = None,
) -> LoadedRows[FeedbackRow]:
    """Load VLFeedback through `datasets`: a `save_to_disk` folder, or a hub id / local dataset folder; `keep`
    selects rows."""
    import datasets

    source = str(name_or_dir)
    path = Path(source)
    if is_saved_dataset(path):
        dataset = datasets.load_from_disk(source)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise InputError(f"data.split: {split!r} is not in saved dataset {source} (has {list(dataset)})")
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as exc:
            raise RuntimeError(
                f"could not load VLFeedback dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}. "
                "Without network access, download it beforehand or pass a local folder / the release jsonl."
            ) from exc
    absent = [name for name in ("prompt", "completions") if name not in dataset.column_names]
    if absent:
        columns = ", ".join(dataset.column_names)
        raise InputError(
            f"{key}: {source} has no {' or '.join(absent)} column (its columns: {columns}); data.source hf reads "
            "VLFeedback's schema, a file of ready pairs is data.source: preference"
        )
    wanted = [name for name in ("id", "prompt", "models", "completions", "img_path") if name in dataset.column_names]
    dataset = dataset.select_columns(wanted)
    return collect_rows(source, iter(dataset), normalize_feedback_row, keep=keep)


def load_preference_file(
    path: str | os.PathLike[str],
    key: str = "data.path",
    splits: tuple[str, ...] = ("train",),
    media: EmbeddedMedia | None = None,
    columns: Mapping[str, str] | None = None,
    keep: Callable[[Any], bool] | None = None,
) -> LoadedRows[PreferenceRow]:
    """Load a generic preference source (.jsonl, .json, .parquet, a folder of parquet shards or a `save_to_disk`
    folder) with prompt/chosen/rejected[/system/image(s)/video(s)/id] (or the `columns` that hold them), plain or in
    a chat layout; `media` writes out the pictures rows hold, `keep` (e.g. the first N prompts) selects rows."""
    path = Path(path)
    seen: set[str] = set()
    media_like: set[str] = set()  # columns named like media whose values are paths or pictures

    def noting_columns(records: Iterable[Any]) -> Iterator[Any]:
        for record in records:
            if isinstance(record, Mapping):
                seen.update(map(str, record))
                media_like.update(name for name, value in record.items() if _names_media(str(name), value))
            yield record

    normalize = functools.partial(normalize_preference_row, media=media, columns=columns)
    records = noting_columns(preference_records(path, key, splits))
    loaded = collect_rows(str(path), records, normalize, media=media, keep=keep)
    missing = {name: column for name, column in (columns or {}).items() if column is not None and column not in seen}
    if missing and loaded.rows_seen:
        name, column = next(iter(missing.items()))
        raise InputError(f"data.columns.{name} = {column!r} names no column of {path} (its columns: "
                         f"{', '.join(sorted(seen)[:20])})")  # fmt: skip
    mapped = {column for column in (columns or {}).values() if column}
    unread = sorted(media_like - set(READ_MEDIA) - mapped)
    if unread and loaded.rows and not any(row.images or row.videos for row in loaded.rows):
        kind = "videos" if "video" in unread[0].lower() else "images"
        raise InputError(
            f"no row of {path} has a picture or video, yet its column {unread[0]!r} holds their paths (Silkie reads "
            f"image/images/video/videos): map it with data.columns: {{{kind}: {unread[0]}}}"
        )
    return loaded


MEDIA_WORDS = ("image", "img", "picture", "photo", "video")
READ_MEDIA = ("image", "images", "video", "videos")
MEDIA_FILE = re.compile(r"\.(jpe?g|png|webp|gif|bmp|tiff?|mp4|mkv|avi|mov|webm)$", re.IGNORECASE)


def _names_media(name: str, value: Any) -> bool:
    """A column whose name says media (`image_path`, `img`, `video_file`) and whose value is a media file's path or
    a picture (bytes, a datasets Image dict), or a list of them: a text-only run would silently leave it unread
    (a caption or a flag under such a name is not one)."""
    if not any(word in name.lower() for word in MEDIA_WORDS):
        return False
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(
        (isinstance(item, str) and MEDIA_FILE.search(item.strip()) is not None)
        or isinstance(item, bytes) or (isinstance(item, Mapping) and {"bytes", "path"} & set(item))
        for item in values
    )  # fmt: skip
