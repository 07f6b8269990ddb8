"""What became of a source's rows and pairs: counts kept and dropped per reason, with the first cases (the reasons:
docs/data.md, "What is dropped")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from silkie.data.sources import MAX_DETAIL, MAX_EXAMPLE_IDS, LoadedRows


@dataclass
class PairReport:
    """Counts of rows and pairs kept / dropped per reason, with the first offending ids per reason."""

    source: str = "rows"
    rows_seen: int = 0
    rows_kept: int = 0
    rows_dropped: Counter = field(default_factory=Counter)
    pairs_kept: int = 0
    pairs_dropped: Counter = field(default_factory=Counter)
    offending_ids: dict[str, list[str]] = field(default_factory=dict)
    first_details: dict[str, str] = field(default_factory=dict)  # reason -> "id: what was wrong" of the first one
    too_long_with_video: int = 0  # of the pairs dropped as too_long, those holding a video

    def _example(self, reason: str, row_id: str, detail: str = "") -> None:
        examples = self.offending_ids.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLE_IDS and row_id not in examples:
            examples.append(row_id)
        case = f"{row_id}: {detail}" if detail else row_id
        self.first_details.setdefault(reason, case if len(case) <= MAX_DETAIL else case[: MAX_DETAIL - 3] + "...")

    def drop_row(self, reason: str, row_id: str, count: int = 1, detail: str = "") -> None:
        """Count `count` dropped rows under `reason` (`detail`: what was wrong, e.g. the missing field)."""
        self.rows_dropped[reason] += count
        self._example(reason, row_id, detail)

    def drop_pair(self, reason: str, row_id: str) -> None:
        """Count one dropped pair under `reason`."""
        self.pairs_dropped[reason] += 1
        self._example(reason, row_id)

    def record_later_drops(self, reason: str, count: int, example_ids: Iterable[str] = ()) -> None:
        """Move `count` already-kept pairs to `pairs_dropped[reason]` (e.g. dropped at tokenization)."""
        self.pairs_dropped[reason] += count
        self.pairs_kept -= count
        for row_id in example_ids:
            self._example(reason, row_id)

    def merge_loader(self, loaded: LoadedRows) -> None:
        """Fold a loader's skipped rows into this report."""
        self.rows_seen += sum(loaded.skipped.values())
        for reason, count in loaded.skipped.items():
            self.rows_dropped[reason] += count
            for number, row_id in enumerate(loaded.skipped_ids.get(reason, [])):
                self._example(reason, row_id, loaded.first_details.get(reason, "") if number == 0 else "")

    def summary(self) -> str:
        """One line: rows seen/kept/dropped and pairs kept/dropped, per reason with its first case."""

        def fmt(counter: Counter) -> str:
            parts = [
                f"{reason}: {n} (first: {self.first_details[reason]})"
                if reason in self.first_details
                else f"{reason}: {n}"
                for reason, n in sorted(counter.items())
            ]
            return "{" + ", ".join(parts) + "}"

        return (
            f"{self.source}: rows seen={self.rows_seen} kept={self.rows_kept} dropped={fmt(self.rows_dropped)}; "
            f"pairs kept={self.pairs_kept} dropped={fmt(self.pairs_dropped)}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of all counters."""
        return {
            "source": self.source,
            "rows_seen": self.rows_seen,
            "rows_kept": self.rows_kept,
            "rows_dropped": dict(self.rows_dropped),
            "pairs_kept": self.pairs_kept,
            "pairs_dropped": dict(self.pairs_dropped),
            "offending_ids": {reason: list(ids) for reason, ids in self.offending_ids.items()},
            "first_details": dict(self.first_details),
        }
