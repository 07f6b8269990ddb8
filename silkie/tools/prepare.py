"""Checks of a downloaded VLFeedback release (jsonl + image zip/folder) and conversion to a preference parquet.

The report covers rows (seen, loaded, skipped per reason with first ids), images (referenced, missing,
unreadable in a verified sample or all), and pairs (kept, dropped per reason) under given pair rules.
The converted file is a generic preference parquet (`id`, `prompt`, `image`, `chosen`, `rejected`,
`chosen_score`, `rejected_score`) read by recipes with `data.source: preference`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from silkie.data.sources import ASPECTS, MAX_EXAMPLE_IDS, LoadedRows
from silkie.tools.cli import ToolError

PARQUET_NAME = "vlfeedback_pairs.parquet"
PARQUET_COLUMNS = ("id", "prompt", "image", "chosen", "rejected", "chosen_score", "rejected_score")
WRITE_BATCH = 20_000


@dataclass
class PairRules:
    """How pairs are built (the recipe's `data.*` keys of the same names)."""

    aspect_weights: dict[str, float] | None = None
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None
    cap_strategy: str = "margin"
    seed: int = 0
    rating_rules: str = "checked"


@dataclass
class ImageCheck:
    """What the image store holds for the loaded rows."""

    referenced: int = 0
    missing: int = 0
    missing_ids: list[str] = field(default_factory=list)
    verified: int = 0
    unreadable: int = 0
    unreadable_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class ReleaseReport:
    """Everything `check_release` found; `as_dict()` is the `--json` output."""

    jsonl: str
    images: str
    rows_seen: int
    rows_loaded: int
    rows_skipped: dict[str, int]
    skipped_ids: dict[str, list[str]]
    skipped_details: dict[str, str]  # reason -> what was wrong with its first row (the missing field, ...)
    duplicate_ids: int
    image_check: ImageCheck
    rules: PairRules
    pairs: dict[str, Any]
    converted: str | None = None
    kind: str = "vlfeedback"  # or "preference": a file of ready pairs
    embedded: int = 0  # pictures / videos the rows held, written into the images folder

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)

    @property
    def problems(self) -> int:
        """Rows skipped + images missing or unreadable + duplicated ids."""
        return (
            sum(self.rows_skipped.values())
            + self.image_check.missing
            + self.image_check.unreadable
            + (self.duplicate_ids)
        )


def parse_aspect_weights(text: str | None) -> dict[str, float] | None:
    """`"Helpfulness=1,Visual Faithfulness=2"` or a JSON object -> weights; names match case-insensitively by prefix."""
    if not text:
        return None
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ToolError(f"--aspect-weights: not valid JSON ({err})") from err
        items = list(raw.items())
    else:
        items = []
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise ToolError(f"--aspect-weights: {part!r} is not NAME=WEIGHT")
            items.append((name, value))
    weights = {}
    for name, value in items:
        matches = [a for a in ASPECTS if a.lower().startswith(str(name).strip().lower())]
        if len(matches) != 1:
            raise ToolError(f"--aspect-weights: {name!r} names no single aspect of {', '.join(ASPECTS)}")
        try:
            weights[matches[0]] = float(value)
        except (TypeError, ValueError) as err:
            raise ToolError(f"--aspect-weights: weight {value!r} of {matches[0]} is not a number") from err
    return weights


def check_images(rows: list, store: Any, verify_all: bool, sample: int, seed: int = 0) -> ImageCheck:
    """Existence of every row's images and videos (a row counts once); decoding of all rows whose media are present,
    or a seeded sample of them (videos at the default frame sampling)."""
    from silkie.data.images import ImageLoadError
    from silkie.data.video import VideoSampling, decode_video

    check = ImageCheck()
    present = []
    for row in rows:
        if not (row.images or row.videos):
            continue
        check.referenced += 1
        if all(store.exists(key) for key in (*row.images, *row.videos)):
            present.append(row)
        else:
            check.missing += 1
            if len(check.missing_ids) < MAX_EXAMPLE_IDS:
                check.missing_ids.append(row.id)
    to_open = present if verify_all or sample >= len(present) else random.Random(seed).sample(present, sample)
    for row in to_open:
        check.verified += 1
        try:
            for key in row.images:
                store.open(key).close()
            for key in row.videos:
                decode_video(key, store.read_bytes(key), VideoSampling())
        except ImageLoadError as err:
            check.unreadable += 1
            check.unreadable_ids[row.id] = err.reason
    return check


def is_preference_file(path: str | Path) -> bool:
    """Whether `path` holds ready pairs (a parquet or a folder, or a JSON(L) file whose first row has no
    `completions`: plain, TRL, ShareGPT or ms-swift rows, or columns of other names) rather than a VLFeedback
    release."""
    path = Path(path)
    if path.suffix.lower() == ".parquet" or path.is_dir():
        return True  # a parquet, a folder of them or a `datasets` folder: the VLFeedback release is a jsonl
    if not path.is_file():
        return False
    from silkie.data.records import BOM

    with path.open("rb") as handle:
        first = next((line for line in handle if line.strip()), b"").strip().removeprefix(BOM)
    try:
        if first.startswith(b"["):  # a JSON array (one line or pretty-printed): its first element
            rows = json.loads(path.read_bytes().removeprefix(BOM))
            row = rows[0] if isinstance(rows, list) and rows else None
        else:
            row = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(row, dict) and not {"completions", "models", "img_path"} & set(row)  # a release's keys


def _without_rows(loaded: LoadedRows, drop: set[str]) -> LoadedRows:
    kept = [row for row in loaded.rows if row.id not in drop]
    return replace(loaded, rows=kept, rows_seen=loaded.rows_seen - (len(loaded.rows) - len(kept)))


def rule_pairs(loaded: LoadedRows, store: Any, rules: PairRules, unreadable: set[str], preference: bool) -> tuple:
    """The pairs training would build from these rows (`data.build.pairs_for`, the rules of a recipe with these
    keys, the media limits a recipe leaves at their defaults); rows with unreadable media count as dropped."""
    from silkie.config import DataSection
    from silkie.data.build import pairs_for

    section = DataSection(source="preference" if preference else "vlfeedback", path=loaded.name,
                          aspect_weights=rules.aspect_weights, min_margin=rules.min_margin,
                          max_pairs_per_prompt=rules.max_pairs_per_prompt, cap_strategy=rules.cap_strategy,
                          seed=rules.seed, rating_rules=rules.rating_rules)  # fmt: skip
    try:
        pairs, report = pairs_for(_without_rows(loaded, unreadable), section, store, loaded.name)
    except ValueError as err:
        raise ToolError(str(err)) from err
    for row_id in sorted(unreadable):
        report.rows_seen += 1
        report.drop_row("unreadable_image", row_id)
    return pairs, report


def check_release(
    jsonl: str | Path,
    images: str | Path,
    rules: PairRules | None = None,
    verify_images: bool = False,
    sample_images: int = 100,
    columns: dict[str, str] | None = None,
    split: str = "train",
) -> tuple[ReleaseReport, list]:
    """Load the release (or preference file, its own column names in `columns` as `data.columns`), check its
    images, build pairs; returns the report and the pairs."""
    from silkie.data.embedded import EmbeddedMedia
    from silkie.data.images import open_image_store
    from silkie.data.sources import load_preference_file, load_vlfeedback_jsonl

    rules = rules or PairRules()
    preference = is_preference_file(jsonl)
    # pictures a preference file's rows hold are written into the images folder, where data.images finds them
    folder = Path(images).is_dir() or not Path(images).exists() and Path(images).suffix.lower() != ".zip"
    media = EmbeddedMedia(images) if preference and folder else None
    try:
        if columns and not preference:
            raise ToolError(f"--columns: {jsonl} is a VLFeedback release, whose columns are fixed")
        loaded = (
            load_preference_file(jsonl, media=media, columns=columns, splits=(split,))
            if preference
            else load_vlfeedback_jsonl(jsonl)
        )
        store = open_image_store(images) if loaded.rows or Path(images).exists() else None
    except (FileNotFoundError, ValueError) as err:
        raise ToolError(str(err)) from err
    id_counts = Counter(row.id for row in loaded.rows)
    image_check = check_images(loaded.rows, store, verify_images, sample_images, rules.seed)
    pairs, pair_report = rule_pairs(loaded, store, rules, set(image_check.unreadable_ids), preference)
    if preference:  # ready pairs, one per row: rows sharing an id are pairs of one prompt there, not duplicates
        id_counts = Counter()
    report = ReleaseReport(
        jsonl=str(jsonl),
        images=str(images),
        rows_seen=loaded.rows_seen,
        rows_loaded=len(loaded.rows),
        rows_skipped=dict(loaded.skipped),
        skipped_ids={reason: list(ids) for reason, ids in loaded.skipped_ids.items()},
        skipped_details=dict(loaded.first_details),
        duplicate_ids=sum(count - 1 for count in id_counts.values() if count > 1),
        image_check=image_check,
        rules=rules,
        pairs=pair_report.as_dict(),
        kind="preference" if preference else "vlfeedback",
        embedded=media.keys_given if media is not None else 0,
    )
    return report, pairs


def write_preference_parquet(pairs: list, path: str | Path) -> Path:
    """Write pairs as a preference parquet (`id` = prompt id, so the train/eval split stays by prompt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.float64() if name.endswith("_score") else pa.string()) for name in PARQUET_COLUMNS])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(staging, schema) as writer:
        for start in range(0, len(pairs), WRITE_BATCH):
            chunk = pairs[start : start + WRITE_BATCH]
            columns = {
                "id": [p.prompt_id for p in chunk],
                "prompt": [p.prompt for p in chunk],
                "image": [p.images[0] if p.images else None for p in chunk],  # VLFeedback: one image
                "chosen": [p.chosen for p in chunk],
                "rejected": [p.rejected for p in chunk],
                "chosen_score": [p.chosen_score for p in chunk],
                "rejected_score": [p.rejected_score for p in chunk],
            }
            writer.write_table(pa.table(columns, schema=schema))
    staging.replace(path)
    return path


def _counts(
    counter: dict[str, int], examples: dict[str, list[str]], details: dict[str, str] | None = None
) -> list[str]:
    lines = []
    for reason, count in sorted(counter.items()):
        ids, detail = examples.get(reason, []), (details or {}).get(reason)
        shown = [f"first ids: {', '.join(ids)}"] if ids else []
        shown += [f"the first: {detail}"] if detail else []
        lines.append(f"    {reason}: {count}" + (f" ({'; '.join(shown)})" if shown else ""))
    return lines


def _pair_details(pairs: dict[str, Any], examples: dict[str, list[str]]) -> dict[str, str]:
    """What was wrong with the first row of each pair-building drop (`first_details` less its id, shown beside)."""
    details = {}
    for reason, case in pairs.get("first_details", {}).items():
        first = (examples.get(reason) or [""])[0]
        if case.startswith(f"{first}: "):
            details[reason] = case[len(first) + 2 :]
    return details


def format_report(report: ReleaseReport) -> str:
    """The human-readable report: one reconciled table of rows and pairs (rows in the file = dropped + kept;
    candidate pairs of the kept rows = dropped + kept, with each reason as the data pipeline names it), then the
    images and the pairing rules."""
    check, pairs = report.image_check, report.pairs
    rows_dropped, pairs_dropped = sum(pairs["rows_dropped"].values()), sum(pairs["pairs_dropped"].values())
    candidates = pairs["pairs_kept"] + pairs_dropped
    examples = {**pairs["offending_ids"], **report.skipped_ids}
    at_reading = set(report.rows_skipped)
    what = "preference file" if report.kind == "preference" else "release"
    lines = [f"{what}: {report.jsonl} (images: {report.images})", f"  {'rows in the file':<24}{report.rows_seen:>8}"]
    lines.append(f"  {'rows dropped':<24}{rows_dropped:>8}")
    details = {**_pair_details(pairs, examples), **report.skipped_details}
    lines += [f"  {line}" + (" (at reading)" if line.split(":")[0].strip() in at_reading else "") for line in
              _counts(pairs["rows_dropped"], examples, details)]  # fmt: skip
    lines.append(f"  {'rows kept':<24}{pairs['rows_kept']:>8}  -> {candidates} candidate pairs")
    lines.append(f"  {'pairs dropped':<24}{pairs_dropped:>8}")
    lines += [f"  {line}" for line in _counts(pairs["pairs_dropped"], pairs["offending_ids"])]
    lines.append(f"  {'pairs kept':<24}{pairs['pairs_kept']:>8}")
    lines.append(
        f"  ({report.rows_seen} = {rows_dropped} + {pairs['rows_kept']} rows; "
        f"{candidates} = {pairs_dropped} + {pairs['pairs_kept']} pairs)"
    )
    if report.duplicate_ids:
        lines.append(f"  duplicate ids: {report.duplicate_ids}")
    lines.append(f"images (and videos): rows with media {check.referenced}, missing {check.missing}")
    if report.embedded:
        lines.append(f"    {report.embedded} held in the rows, written to {Path(report.images) / 'embedded'}/")
    if check.missing_ids:
        lines.append(f"    first missing: {', '.join(check.missing_ids)}")
    lines.append(
        f"    decoded {check.verified} of {check.referenced - check.missing} present, unreadable {check.unreadable}"
    )
    lines += [
        f"    unreadable {row_id}: {reason}" for row_id, reason in list(check.unreadable_ids.items())[:MAX_EXAMPLE_IDS]
    ]
    rules = report.rules
    lines.append(
        "rules: none (ready pairs, one per row)" if report.kind == "preference" else
        f"rules: aspect_weights={rules.aspect_weights or 'equal'}, min_margin={rules.min_margin}, "
        f"max_pairs_per_prompt={rules.max_pairs_per_prompt}, rating_rules={rules.rating_rules}"
    )  # fmt: skip
    if report.converted:
        lines.append(f"converted: {report.converted} ({pairs['pairs_kept']} pairs); train on it with")
        lines.append(f"  data.source=preference data.path={report.converted} data.images={report.images}")
    return "\n".join(lines)


def strict_failure(report: ReleaseReport) -> str | None:
    """Why `--strict` fails (one line), or None when nothing was skipped, missing, unreadable or duplicated."""
    check = report.image_check
    parts = [f"{n} row(s) skipped at reading ({', '.join(sorted(report.rows_skipped))})"] if (
        n := sum(report.rows_skipped.values())) else []  # fmt: skip
    parts += [f"{check.missing} image(s) missing"] if check.missing else []
    parts += [f"{check.unreadable} image(s) unreadable"] if check.unreadable else []
    parts += [f"{report.duplicate_ids} duplicated id(s)"] if report.duplicate_ids else []
    return f"--strict: {', '.join(parts)}" if parts else None
