"""Raw records (dicts, or a `RowError` for a line that cannot be read) from the files a source names: JSON lines,
a JSON array, parquet (one file, or a folder of shards as the hub stores them) and `datasets` save_to_disk folders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from silkie.data.row_error import RowError
from silkie.errors import InputError, MissingInputError

# a hub shard's split: `data/train-00000-of-00014.parquet`, `train_prefs-00000-of-00001.parquet`; else a file name
# that starts with a common split name
HUB_SHARD = re.compile(r"^(.+?)-\d{5}-of-\d{5}\.parquet$")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")
SPLIT_FILE = re.compile(rf"^({'|'.join(SPLIT_NAMES)})[-_.]")


def _split_of(name: str) -> str | None:
    match = HUB_SHARD.match(name) or SPLIT_FILE.match(name)
    return match.group(1) if match else None


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


def jsonl_records(path: Path) -> Iterator[Any]:
    """A JSON-lines file's rows; a line that is not UTF-8 or not JSON is a `RowError` (skipped, not fatal). A
    UTF-8 byte-order mark (as Windows editors write) is read past."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield RowError("bad_encoding", f"line {line_number}")
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                yield RowError("bad_json", f"line {line_number}", f"{err.msg} at character {err.pos + 1}")


def json_records(path: Path) -> Iterator[Any]:
    """A `.json` file: a JSON array of rows, or (as often in practice) JSON lines."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        yield from jsonl_records(path)
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    yield from data


def parquet_records(paths: list[Path]) -> Iterator[Any]:
    """The rows of parquet files, in order (a picture column as its `{bytes, path}` struct)."""
    import pyarrow.parquet as pq

    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def parquet_shards(folder: Path, splits: tuple[str, ...], key: str) -> list[Path]:
    """The parquet files under `folder`: all of them, or, where their names carry a split (`train-00000-of-...`),
    those of the first of `splits` that has any."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise MissingInputError(f"{key}: {folder} is a folder with neither a saved dataset nor parquet files")
    by_split: dict[str | None, list[Path]] = {}
    for path in files:
        by_split.setdefault(_split_of(path.name), []).append(path)
    names = set(by_split) - {None}
    if not names or (len(by_split) == 1 and not names & set(SPLIT_NAMES)):  # one group, no split words: all of it
        return files
    split = next((name for name in splits if name in by_split), None)
    if split is None:
        named = sorted(name for name in by_split if name)
        raise InputError(f"{key}: the parquet files under {folder} are of the splits {named}, none of {list(splits)}")
    return by_split[split]


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder `datasets.Dataset(Dict).save_to_disk` wrote."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def dataset_records(dataset: Any) -> Iterator[Any]:
    """A `datasets.Dataset`'s rows as stored: an Image / Video column as its `{bytes, path}`, not decoded."""
    for batch in dataset.with_format("arrow").iter(batch_size=256):
        yield from batch.to_pylist()


def preference_records(path: Path, key: str, splits: tuple[str, ...]) -> Iterator[Any]:
    """The raw rows of a preference source: a save_to_disk folder (its first split of `splits`), a folder of parquet
    shards, or a .jsonl / .json / .parquet file."""
    if is_saved_dataset(path):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            split = next((name for name in splits if name in dataset), None)
            if split is None:
                raise InputError(f"{key}: saved dataset {path} has none of the splits {splits} (has {list(dataset)})")
            dataset = dataset[split]
        return dataset_records(dataset)
    if path.is_dir():
        return parquet_records(parquet_shards(path, splits, key))
    if not path.is_file():
        raise MissingInputError(f"preference file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return parquet_records([path])
    if suffix == ".jsonl":
        return jsonl_records(path)
    if suffix == ".json":
        return json_records(path)
    raise InputError(
        f"{key}: a preference file is .jsonl, .json, .parquet, a folder of parquet files or a saved dataset, not "
        f"{path.name}"
    )
