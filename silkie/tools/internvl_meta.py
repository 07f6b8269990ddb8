"""InternVL's data meta file (MMPR's `meta.json`) as one preference file for `data.source: preference`.

A meta file names datasets, `{name: {"root": image folder, "annotation": jsonl, "repeat_time": r, ...}}`; an
annotation row is `{"image": path or [paths], "question", "chosen", "rejected"}` (or `"video": path`; media paths
relative to its root; neither: a text-only pair). The conversion writes one jsonl of `{"id", "prompt", "images",
"videos", "chosen", "rejected"}` rows whose media paths are relative to one folder, the roots' common ancestor (the
recipe's `data.images`), and takes each dataset as InternVL's loader (`LazySupervisedDataset`) does: `repeat_time`
< 1 a seeded sample of that share of its rows, > 1 `int(repeat_time)` copies (ids kept distinct, so the copies
stay pairs of their own). A dataset's `max_dynamic_patch` is not applied: `model.max_tiles` bounds every image.
Relative paths in the meta file are read from `base`: by default the first of the current folder, the meta file's
folder and its parent where the datasets' annotation files are (InternVL's scripts read them from where they run).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silkie.tools.cli import ToolError

FIELDS = ("question", "chosen", "rejected")


@dataclass
class MetaDataset:
    """One dataset of a meta file, its paths resolved."""

    name: str
    root: Path
    annotation: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None  # InternVL's per-dataset tile bound (reported, not applied)


@dataclass
class MetaReport:
    """What a conversion read and wrote."""

    base: str = ""
    images_root: str = ""
    rows_written: int = 0
    per_dataset: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)
    tile_bounds: list[int] = field(default_factory=list)  # the datasets' max_dynamic_patch values


def read_meta(meta: str | Path, base: str | Path | None = None) -> tuple[list[MetaDataset], Path]:
    """The datasets of a meta file and the folder its relative paths were read from; `ToolError` naming the key
    or file that is wrong."""
    meta = Path(meta)
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ToolError(f"{meta}: not a readable JSON meta file ({err})") from err
    if not isinstance(entries, dict) or not entries:
        raise ToolError(f"{meta}: expected a JSON object of datasets {{name: {{root, annotation, repeat_time}}}}")
    for name, entry in entries.items():
        missing = [key for key in ("root", "annotation") if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ToolError(f"{meta}: dataset {name!r} has no {' / '.join(missing)}")
    candidates = [Path(base)] if base is not None else [Path.cwd(), meta.parent, meta.parent.parent]
    first = next(iter(entries.values()))["annotation"]
    found = next((folder for folder in candidates if (folder / first).is_file()), None)
    if found is None:
        tried = ", ".join(str(folder) for folder in candidates)
        raise ToolError(f"{meta}: annotation {first!r} is in none of {tried} (give the folder with --base)")
    datasets = []
    for name, entry in entries.items():
        repeat = float(entry.get("repeat_time", 1))
        if repeat <= 0:
            raise ToolError(f"{meta}: dataset {name!r} repeat_time {repeat} (expected a number above 0)")
        patches = entry.get("max_dynamic_patch")
        datasets.append(MetaDataset(name, found / entry["root"], found / entry["annotation"], repeat, patches))
    return datasets, found


def _rows(dataset: MetaDataset, report: MetaReport) -> list[dict[str, Any]]:
    """The dataset's usable rows (a bad line is skipped and counted, its first case named)."""
    rows = []
    try:
        lines = dataset.annotation.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ToolError(f"dataset {dataset.name!r}: cannot read {dataset.annotation} ({err})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        reason = "not_json" if not isinstance(row, dict) else next(
            (f"no_{key}" for key in FIELDS if not isinstance(row.get(key), str) or not row[key].strip()), None
        )  # fmt: skip
        if reason is not None:
            report.skipped[reason] += 1
            report.first_skipped.setdefault(reason, f"{dataset.annotation}:{number}")
            continue
        rows.append({**row, "line": number})
    return rows


def _media_paths(value: Any, root: str) -> list[str]:
    """A row's image or video path(s), relative to the common folder (`root`: the dataset's root from there)."""
    paths = [value] if isinstance(value, str) else list(value or [])
    return [os.path.normpath(os.path.join(root, str(path))) for path in paths]


def _taken(rows: list[dict], repeat: float, rng: random.Random) -> list[tuple[int, dict]]:
    """(copy, row) as InternVL's loader takes a dataset: a seeded share, or `int(repeat)` whole copies."""
    if repeat < 1:
        return [(0, row) for row in rng.sample(rows, k=int(len(rows) * repeat))]
    return [(copy, row) for copy in range(int(repeat)) for row in rows]


def convert_meta(
    meta: str | Path, out: str | Path, base: str | Path | None = None, seed: int = 0
) -> MetaReport:
    """Write the meta file's datasets as one preference jsonl at `out` (written whole, then moved into place)."""
    datasets, found = read_meta(meta, base)
    images_root = Path(os.path.commonpath([str(dataset.root.resolve()) for dataset in datasets]))
    report, rng, written = MetaReport(base=str(found), images_root=str(images_root)), random.Random(seed), []
    report.tile_bounds = sorted({d.max_dynamic_patch for d in datasets if d.max_dynamic_patch is not None})
    for dataset in datasets:
        rows = _rows(dataset, report)
        taken = _taken(rows, dataset.repeat_time, rng)
        report.per_dataset[dataset.name] = {"rows": len(rows), "written": len(taken)}
        root = os.path.relpath(dataset.root.resolve(), images_root)
        for copy, row in taken:
            written.append({
                "id": f"{dataset.name}/{row['line']}" + (f"#{copy}" if copy else ""),
                "prompt": row["question"],
                "images": _media_paths(row.get("image"), root),
                "videos": _media_paths(row.get("video"), root),
                "chosen": row["chosen"],
                "rejected": row["rejected"],
            })  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in written), encoding="utf-8")
    staging.replace(out)
    report.rows_written = len(written)
    return report


def format_meta_report(report: MetaReport, out: str | Path) -> str:
    """The report as lines, ending with the recipe keys that read the file."""
    lines = [f"paths read from {report.base}"]
    for name, counts in report.per_dataset.items():
        lines.append(f"  {name}: {counts['rows']} rows, {counts['written']} written")
    for reason, count in report.skipped.items():
        lines.append(f"  skipped {count} as {reason} (first: {report.first_skipped[reason]})")
    if report.tile_bounds:
        lines.append(f"  the datasets' max_dynamic_patch {report.tile_bounds} is not applied: set model.max_tiles")
    lines.append(f"{report.rows_written} pairs in {out}")
    lines.append(f"recipe: data.source=preference data.path={out} data.images={report.images_root}")
    return "\n".join(lines)
