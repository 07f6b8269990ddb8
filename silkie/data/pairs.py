"""Preference pairs from rated completions (Silkie: all 2-combinations, score = mean aspect rating).

Every dropped row or pair is counted under a reason in a `PairReport`, with its first case (the reasons, row and
pair: docs/data.md, "What is dropped").
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from silkie.data.images import ImageStore
from silkie.data.pair_report import PairReport
from silkie.data.sources import (
    ASPECTS,
    Completion,
    FeedbackRow,
    LoadedRows,
    PreferenceRow,
    RowError,
    normalize_feedback_row,
    normalize_preference_row,
    prompt_key,
)
from silkie.errors import InputError
from silkie.models.media import Turns, as_keys, as_turns, marker_mismatch, user_texts

CapStrategy = Literal["margin", "random"]
RatingRules = Literal["checked", "original"]
RATING_SCALE = (1.0, 5.0)  # VLFeedback's (and the judge rubric's) scale for every aspect
# when both answers of a pair have a bad rating, the pair is counted under the first of these that applies
RATING_PROBLEMS = ("non_numeric_rating", "rating_out_of_range", "missing_rating")


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: a prompt with its image (and video) keys in order, a preferred and a dispreferred answer."""

    prompt_id: str
    prompt: str
    images: tuple[str, ...]
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    videos: tuple[str, ...] = ()
    system: str | None = None  # the system message (None: the chat template's default)
    history: Turns = ()  # earlier (user, assistant) turns before the prompt, oldest first

    def __post_init__(self) -> None:  # one key, a list or None as well; turns as lists too
        object.__setattr__(self, "images", as_keys(self.images))
        object.__setattr__(self, "videos", as_keys(self.videos))
        object.__setattr__(self, "history", as_turns(self.history))

    @property
    def margin(self) -> float:
        """Score difference chosen - rejected."""
        return self.chosen_score - self.rejected_score

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for `datasets` / json; key tuples as lists)."""
        turns = [list(turn) for turn in self.history]
        return {**asdict(self), "images": list(self.images), "videos": list(self.videos), "history": turns}


def resolve_aspect_weights(aspect_weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Normalized aspect weights (sum 1, zero weights removed); None -> equal weights over the three aspects."""
    weights = {aspect: 1.0 for aspect in ASPECTS} if aspect_weights is None else dict(aspect_weights)
    if any(not isinstance(w, (int, float)) or math.isnan(w) or w < 0 for w in weights.values()):
        raise ValueError(f"aspect weights must be non-negative numbers, got {weights}")
    weights = {aspect: float(w) for aspect, w in weights.items() if w > 0}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"aspect weights must have a positive total, got {aspect_weights}")
    return {aspect: w / total for aspect, w in weights.items()}


def parse_rating(raw: str | float | None) -> float | None:
    """A rating string like "4" -> 4.0; non-numeric ("N/A", "") or missing -> None."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score_completion(completion: Completion, weights: Mapping[str, float]) -> tuple[float | None, str | None]:
    """(weighted mean rating, None) or (None, reason) when a weighted aspect is missing or non-numeric."""
    total = 0.0
    for aspect, weight in weights.items():
        raw = completion.ratings.get(aspect)
        if raw is None:
            return None, "missing_rating"
        value = parse_rating(raw)
        if value is None:
            return None, "non_numeric_rating"
        if not RATING_SCALE[0] <= value <= RATING_SCALE[1]:
            return None, "rating_out_of_range"
        total += weight * value
    return total, None


def score_present_aspects(completion: Completion) -> tuple[float | None, str | None]:
    """The Silkie repository's score (`run_dpo.make_batch_pairs`): the plain mean of whichever aspects a completion
    has, out-of-range values included; (None, reason) when it has none or one is not a number."""
    values = [parse_rating(raw) for raw in completion.ratings.values()]
    if not values:
        return None, "missing_rating"
    if None in values:
        return None, "non_numeric_rating"
    return math.fsum(values) / len(values), None


def _cap(
    candidates: list[PreferencePair], k: int | None, strategy: CapStrategy, seed: int, row_id: str
) -> tuple[list[PreferencePair], int]:
    """At most `k` pairs (highest margin first, or a seeded random subset) and how many were cut."""
    if k is None or len(candidates) <= k:
        return candidates, 0
    if strategy == "margin":
        kept = sorted(candidates, key=lambda pair: -pair.margin)[:k]  # sorted() is stable
    else:
        chosen = sorted(random.Random(f"{seed}:{row_id}").sample(range(len(candidates)), k))
        kept = [candidates[index] for index in chosen]
    return kept, len(candidates) - k


def _row_pairs(
    row: FeedbackRow, weights: Mapping[str, float], min_margin: float, report: PairReport, original: bool = False
) -> list[PreferencePair]:
    """The row's usable 2-combinations; `original`: as the Silkie repository builds them (mean of the aspects present,
    empty and identical answers kept)."""
    if original:
        scored = [score_present_aspects(completion) for completion in row.completions]
    else:
        scored = [score_completion(completion, weights) for completion in row.completions]
    candidates: list[PreferencePair] = []
    for i, j in combinations(range(len(row.completions)), 2):
        a, b = row.completions[i], row.completions[j]
        (score_a, bad_a), (score_b, bad_b) = scored[i], scored[j]
        if not original and (not a.response.strip() or not b.response.strip()):
            reason = "empty_answer"
        elif bad_a or bad_b:
            reason = next(problem for problem in RATING_PROBLEMS if problem in (bad_a, bad_b))
        elif math.isclose(score_a, score_b, abs_tol=1e-9):
            reason = "tie"
        elif not original and a.response.strip() == b.response.strip():
            reason = "identical_answers"
        elif abs(score_a - score_b) < min_margin - 1e-9:
            reason = "below_margin"
        else:
            reason = None
        if reason is not None:
            report.drop_pair(reason, row.id)
            continue
        (win, s_win), (lose, s_lose) = sorted(((a, score_a), (b, score_b)), key=lambda item: -item[1])
        candidates.append(
            PreferencePair(row.id, row.prompt, row.images, win.response, lose.response, s_win, s_lose, row.videos)
        )
    return candidates


def _iter_rows(rows: Iterable[Any], normalize: Any, report: PairReport):
    """Normalized rows; raw mappings are normalized here and bad ones counted."""
    if isinstance(rows, LoadedRows):
        report.merge_loader(rows)
    for index, row in enumerate(rows):
        report.rows_seen += 1
        if isinstance(row, (FeedbackRow, PreferenceRow)):
            yield row
            continue
        try:
            yield normalize(row)
        except RowError as error:
            fallback = str(row.get("id", f"row {index}")) if isinstance(row, Mapping) else f"row {index}"
            report.drop_row(error.reason, fallback, detail=error.detail)


@dataclass(frozen=True)
class MediaLimits:
    """Most images / videos one pair may hold (None: any number); a row over one is dropped and counted."""

    max_images: int | None = None
    max_videos: int | None = None


def _media_usable(
    row: FeedbackRow | PreferenceRow, image_store: ImageStore | None, limits: MediaLimits, report: PairReport
) -> bool:
    """False (the row dropped and counted) when it holds more images/videos than allowed, its markers do not match
    them (found here, not only at tokenization: `silkie prepare` reports it) or one is missing."""
    for kind, keys, most in (("image", row.images, limits.max_images), ("video", row.videos, limits.max_videos)):
        if most is not None and len(keys) > most:
            detail = f"{len(keys)} {kind}s, data.max_{kind}s_per_pair={most}"
            report.drop_row(f"too_many_{kind}s", row.id, detail=detail)
            return False
    mismatch = marker_mismatch(user_texts(row.prompt, getattr(row, "history", ())), row.images, row.videos)
    if mismatch is not None:
        report.drop_row("image_marker_mismatch", row.id, detail=mismatch)
        return False
    if image_store is None:
        return True
    for kind, keys in (("image", row.images), ("video", row.videos)):
        missing = next((key for key in keys if not image_store.exists(key)), None)
        if missing is not None:
            reason = f"missing_{kind}"
            detail = ""
            if reason not in report.first_details:  # the first case says what the store holds (another layout?)
                example, where = image_store.example(), str(image_store)
                where = where if len(where) <= 50 else ".../" + "/".join(Path(where).parts[-2:])
                holds = f"which holds e.g. {example}" if example else "which is empty"
                detail = f"{missing} not in {where}, {holds}"
                root = getattr(image_store, "root", None)  # a folder store: a key may name a folder
                if root is not None and (Path(root) / missing).is_dir():
                    detail = f"{missing} is a folder in {where}, not a file"
            report.drop_row(reason, row.id, detail=detail)
            return False
    return True


# Columns that tell a file's kind, and the data.source that reads it.
KIND_COLUMNS = {
    "vlfeedback": ({"completions"}, "a VLFeedback release"),
    "preference": ({"chosen", "rejected"}, "a file of ready pairs"),
}


def _finish(
    pairs: list[PreferencePair], report: PairReport, rows: Any = None, source: str = ""
) -> tuple[list[PreferencePair], PairReport]:
    if not pairs:  # the summary starts with the source; a file of the other kind gets the data.source that reads it
        columns = rows.first_columns if isinstance(rows, LoadedRows) else frozenset()
        hint = next((f"; its rows look like {what}: data.source: {kind}" for kind, (needs, what) in KIND_COLUMNS.items()
                     if kind != source and needs <= columns), "")  # fmt: skip
        raise InputError(f"no usable preference pairs in {report.summary()}{hint}")
    return pairs, report


def _source_name(rows: Any, source: str | None) -> str:
    if source is not None:
        return source
    return rows.name if isinstance(rows, LoadedRows) else "rows"


def build_vlfeedback_pairs(
    rows: Iterable[FeedbackRow | Mapping[str, Any]],
    aspect_weights: Mapping[str, float] | None = None,
    min_margin: float = 0.0,
    max_pairs_per_prompt: int | None = None,
    cap_strategy: CapStrategy = "margin",
    seed: int = 0,
    image_store: ImageStore | None = None,
    source: str | None = None,
    limits: MediaLimits = MediaLimits(),
    rating_rules: RatingRules = "checked",
) -> tuple[list[PreferencePair], PairReport]:
    """Silkie pairs: every 2-combination of a row's answers, chosen = higher (weighted) mean rating. `rows` are
    `FeedbackRow`s (a loader's `LoadedRows`: its skipped rows enter the report) or raw VLFeedback dicts; with
    `image_store`, rows whose image is absent are dropped (`missing_image`). `rating_rules`: `checked` needs every
    weighted aspect rated 1-5 and drops empty or identical answers; `original` scores as the Silkie repository
    (`score_present_aspects`). Raises `ValueError` naming the source when no pair survives."""
    if rating_rules not in ("checked", "original"):
        raise ValueError(f"rating_rules must be 'checked' or 'original', got {rating_rules!r}")
    if rating_rules == "original" and aspect_weights is not None:
        raise ValueError("aspect weights need rating_rules 'checked' (the original rules weigh every aspect equally)")
    if cap_strategy not in ("margin", "random"):
        raise ValueError(f"cap_strategy must be 'margin' or 'random', got {cap_strategy!r}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    weights = resolve_aspect_weights(aspect_weights)
    report = PairReport(source=_source_name(rows, source))
    pairs: list[PreferencePair] = []
    first_rows: dict[str, FeedbackRow] = {}
    rated: set[str] = set()  # every aspect a completion rates (a weighted aspect no row rates is a typo)
    for row in _iter_rows(rows, normalize_feedback_row, report):
        rated.update(aspect for completion in row.completions for aspect in completion.ratings)
        # one row per id: its image is found by the id, and its pairs are capped per id
        earlier = first_rows.setdefault(row.id, row)
        if earlier is not row:
            if earlier == row:
                report.drop_row("duplicate_row", row.id, detail="a copy of an earlier row")
            else:
                report.drop_row("reused_id", row.id, detail="the id of an earlier row with another prompt or answers")
            continue
        if not _media_usable(row, image_store, limits, report):
            continue
        candidates = _row_pairs(row, weights, min_margin, report, original=rating_rules == "original")
        kept, over = _cap(candidates, max_pairs_per_prompt, cap_strategy, seed, row.id)
        for _ in range(over):
            report.drop_pair("over_cap", row.id)
        if not kept:
            report.drop_row("no_usable_pairs", row.id)
            continue
        report.rows_kept += 1
        report.pairs_kept += len(kept)
        pairs.extend(kept)
    unrated = sorted(set(weights) - rated)
    if not pairs and unrated and rated and rating_rules == "checked":
        raise InputError(
            f"data.aspect_weights names {', '.join(map(repr, unrated))}, which no row of {report.source} rates (they "
            f"rate {', '.join(map(repr, sorted(rated)))}): every pair lacked that rating"
        )
    return _finish(pairs, report, rows, "vlfeedback")


def pairs_from_preference_rows(
    rows: Iterable[PreferenceRow | Mapping[str, Any]],
    image_store: ImageStore | None = None,
    source: str | None = None,
    limits: MediaLimits = MediaLimits(),
) -> tuple[list[PreferencePair], PairReport]:
    """Pairs from a generic preference source (one pair per row; scores default to 1.0 / 0.0)."""
    report = PairReport(source=_source_name(rows, source))
    pairs: list[PreferencePair] = []
    prompts: dict[str, tuple] = {}  # id -> the prompt and media of its first row
    seen: set[PreferenceRow] = set()
    for row in _iter_rows(rows, normalize_preference_row, report):
        if row in seen:  # the same pair twice would count twice in the loss and the cap
            report.drop_row("duplicate_row", row.id, detail="a copy of an earlier row")
            continue
        seen.add(row)
        # rows of one id are pairs of one prompt (split and reported together): another prompt is an error
        asked = prompt_key(row)
        if prompts.setdefault(row.id, asked) != asked:
            detail = "the id of an earlier row with another prompt (question, or first turn) or media"
            report.drop_row("reused_id", row.id, detail=detail)
            continue
        if not _media_usable(row, image_store, limits, report):
            continue
        if not row.chosen.strip() or not row.rejected.strip():
            reason = "empty_answer"
        elif row.chosen.strip() == row.rejected.strip():
            reason = "identical_answers"
        else:
            reason = None
        if reason is not None:
            report.drop_pair(reason, row.id)
            report.drop_row("no_usable_pairs", row.id)
            continue
        chosen_score = 1.0 if row.chosen_score is None else row.chosen_score
        rejected_score = 0.0 if row.rejected_score is None else row.rejected_score
        pair = (row.id, row.prompt, row.images, row.chosen, row.rejected, chosen_score, rejected_score)
        pairs.append(PreferencePair(*pair, videos=row.videos, system=row.system, history=row.history))
        report.rows_kept += 1
        report.pairs_kept += 1
    return _finish(pairs, report, rows, "preference")
