"""The recipe's data section: where the preference data comes from and how pairs are built (a typed dataclass, help
text and reader on every key, its own value checks). Imports no torch."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from silkie.errors import RecipeError

from .checks import choice, key, require
from .names import IMAGE_CORRUPTIONS, PREFERENCE_FIELDS


@dataclass
class DataSection:
    """Where the preference data comes from and how pairs are built."""

    source: str = key(
        "vlfeedback",
        "`vlfeedback` (release jsonl), `hf` (a Hub dataset id or saved dataset) or `preference` "
        "(prompt/chosen/rejected rows).",
        "data.build:_load_rows",
    )
    path: str = key(
        "",
        "What to read: the release jsonl (vlfeedback), a dataset id or folder (hf), or a preference file, folder of "
        "parquet shards or save_to_disk folder (preference).",
        "data.build:_load_rows",
    )
    images: str | None = key(
        None,
        "Images (and videos): the release's `merged_images.zip`, another zip or a folder; null when the rows carry "
        "none, or hold the pictures themselves (a `datasets` Image column: written to `<cache_dir>/media/`).",
        "data.build:build_pairs",
    )
    columns: dict[str, str | None] | None = key(
        None,
        "source preference: the file's own column names for the fields a row is read from, e.g. "
        "`{prompt: question, id: idx}` (openbmb/RLAIF-V-Dataset); fields: " + ", ".join(PREFERENCE_FIELDS) + "; "
        "a field mapped to null is not read (`{history: null}`). null: the names as they are.",
        "data.build:_load_rows",
    )
    split: str = key(
        "train",
        "Dataset split for `source: hf`, and of a `save_to_disk` folder or hub parquet shards for `source: "
        "preference` (data.path; data.eval_path takes test, validation or eval, else train).",
        "data.build:_load_rows",
    )
    aspect_weights: dict[str, float] | None = key(
        None,
        "Weights of the annotation aspects in a completion's score; null = all aspects equally.",
        "data.build:pairs_for",
    )
    rating_rules: str = key(
        "checked",
        "How ratings become pairs: `checked` (every weighted aspect rated 1-5; empty or identical answers dropped) "
        "or `original` (as the Silkie repository: the mean of the aspects a completion has, out-of-range ratings and "
        "empty or identical answers kept; equal weights).",
        "data.build:pairs_for",
    )
    min_margin: float = key(
        0.0,
        "Smallest score difference for a (chosen, rejected) pair; ties and closer pairs are dropped.",
        "data.build:pairs_for",
    )
    max_pairs_per_prompt: int | None = key(
        None,
        "At most this many pairs per prompt; null = all pairs.",
        "data.build:pairs_for",
    )
    cap_strategy: str = key(
        "margin",
        "Which pairs the cap keeps: `margin` (largest margins first) or `random`.",
        "data.build:pairs_for",
    )
    max_prompts: int | None = key(
        None,
        "Use only the first N prompts (quick runs); null = all.",
        "data.build:_load_rows",
    )
    eval_fraction: float = key(
        0.0,
        "Fraction of prompts held out for evaluation (split by prompt, so no prompt is in both).",
        "data.build:build_pairs",
    )
    eval_size: int | None = key(
        None,
        "Held-out prompts as a count (instead of a fraction; eval_fraction must then be 0); null = use eval_fraction.",
        "data.build:build_pairs",
    )
    eval_split: str = key(
        "ranked",
        "How eval_fraction / eval_size pick prompts by a seeded hash: `ranked`, the exact count of lowest hashes among "
        "the prompts present; `hashed`, each prompt whose hash falls below eval_fraction, whatever else the data "
        "holds, so a prompt keeps its side when the data grows or changes (annotate rounds use it).",
        "data.build:build_pairs",
    )
    eval_path: str | None = key(
        None,
        "A file (or dataset) of held-out pairs of its own, read as `data.source` and the pair rules say, instead of "
        "a split of data.path (eval_fraction and eval_size stay unset).",
        "data.build:build_pairs",
    )
    truncation: str = key(
        "drop",
        "Pairs longer than dpo.max_length: `drop` them, or cut the `answer`s to fit.",
        "data.build:prepare_data",
    )
    num_proc: int = key(
        1,
        "Processes for tokenizing the pairs.",
        "data.build:prepare_data",
    )
    cache_dir: str | None = key(
        None,
        "Where tokenized pairs (and the pictures rows hold, in `media/`) are cached; null = `<working>/cache`.",
        "train.build:build_trainer",
    )
    seed: int = key(
        0,
        "Seed for pair capping and the held-out split (and of each image's corruption).",
        "data.build:build_pairs",
    )
    image_corruption: str = key(
        "crop",
        "How the vision-aware losses and diagnostics corrupt an image (the same corrupted copy every epoch and on "
        "every rank): `crop` (a random crop keeping 1-20% of its area, resized back, as mDPO), `mask` (80% of its "
        "cells blacked out), `noise` (mostly noise), `blank` (grey).",
        "train.build:_trainer",
    )
    max_images_per_pair: int | None = key(
        8,
        "Most images one pair may hold (`images: [...]` of a preference row); a row with more is dropped and "
        "counted (`too_many_images`). null: any number.",
        "data.build:media_limits",
    )
    max_videos_per_pair: int | None = key(
        2,
        "Most videos one pair may hold (the Qwen2-VL / 2.5-VL / 3-VL families; the others take none); a row with more "
        "is dropped (`too_many_videos`).",
        "data.build:media_limits",
    )
    video_fps: float = key(
        2.0,
        "Frames per second sampled from a video (Qwen2-VL's default), within `video_min_frames`..`video_max_frames`.",
        "train.build:video_sampling",
    )
    video_min_frames: int = key(
        4,
        "Fewest frames sampled from a video (fewer when it has fewer).",
        "train.build:video_sampling",
    )
    video_max_frames: int = key(
        64,
        "Most frames sampled from a video (uniformly over the whole clip once `video_fps` would give more).",
        "train.build:video_sampling",
    )

    def check(self) -> None:
        choice("data.source", self.source, ("vlfeedback", "hf", "preference"))
        require(bool(self.path), "data.path", self.path, "the data file, folder or dataset id")
        choice("data.cap_strategy", self.cap_strategy, ("margin", "random"))
        choice("data.image_corruption", self.image_corruption, IMAGE_CORRUPTIONS)
        choice("data.truncation", self.truncation, ("drop", "answer"))
        choice("data.rating_rules", self.rating_rules, ("checked", "original"))
        if self.rating_rules == "original" and self.aspect_weights is not None:
            raise RecipeError(
                "recipe: data.aspect_weights needs data.rating_rules = checked (the original rules weigh every aspect "
                "a completion has equally)"
            )
        self._check_columns()
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a number in [0, 1)")
        if self.eval_path is not None and (self.eval_fraction or self.eval_size is not None):
            raise RecipeError(
                "recipe: data.eval_path holds the held-out pairs; leave data.eval_fraction and data.eval_size unset"
            )
        if self.eval_fraction and self.eval_size is not None:
            raise RecipeError(
                f"recipe: data.eval_fraction = {self.eval_fraction} and data.eval_size = {self.eval_size} are both "
                "set; set one of them (data.eval_fraction=0 to hold out eval_size prompts)"
            )
        choice("data.eval_split", self.eval_split, ("ranked", "hashed"))
        if self.eval_split == "hashed" and self.eval_path is not None:
            raise RecipeError("recipe: data.eval_split = 'hashed' splits data.path, but data.eval_path gives the "
                              "held-out pairs; leave data.eval_split unset")  # fmt: skip
        if self.eval_split == "hashed" and not self.eval_fraction:
            raise RecipeError("recipe: data.eval_split = 'hashed' holds out the prompts whose hash falls below "
                              "data.eval_fraction, 0 here; set data.eval_fraction (not eval_size)")  # fmt: skip
        require(self.min_margin >= 0, "data.min_margin", self.min_margin, "a number >= 0")
        require(self.num_proc >= 1, "data.num_proc", self.num_proc, "an integer >= 1")
        for name, value in (
            ("max_pairs_per_prompt", self.max_pairs_per_prompt),
            ("max_prompts", self.max_prompts),
            ("eval_size", self.eval_size),
        ):
            require(value is None or value >= 1, f"data.{name}", value, "null or an integer >= 1")
        for name in ("max_images_per_pair", "max_videos_per_pair"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"data.{name}", value, "null or an integer >= 0")
        require(0 < self.video_fps <= 240, "data.video_fps", self.video_fps, "a number in (0, 240]")
        require(self.video_min_frames >= 1, "data.video_min_frames", self.video_min_frames, "an integer >= 1")
        require(
            self.video_max_frames >= self.video_min_frames,
            "data.video_max_frames",
            self.video_max_frames,
            f"an integer >= data.video_min_frames ({self.video_min_frames})",
        )

    def _check_columns(self) -> None:
        if self.columns is None:
            return
        if self.source != "preference":
            raise RecipeError(f"recipe: data.columns renames a preference file's columns; data.source is "
                              f"{self.source!r}, whose schema is fixed")  # fmt: skip
        for field, column in self.columns.items():
            close = difflib.get_close_matches(str(field), PREFERENCE_FIELDS, n=1, cutoff=0.6)
            if field not in PREFERENCE_FIELDS and column in PREFERENCE_FIELDS and not close:
                raise RecipeError(f"recipe: data.columns = {self.columns!r}: the keys are the fields, the values the "
                                  f"file's columns; write {{{column}: {field}}}")  # fmt: skip
            choice("data.columns", field, PREFERENCE_FIELDS)
            if column is None and field not in ("prompt", "chosen", "rejected"):
                continue  # the file's column of that name is not read
            require(isinstance(column, str) and bool(column), f"data.columns.{field}", column, "a column name")
        named = [column for column in self.columns.values() if column is not None]
        taken = [column for column in named if named.count(column) > 1]
        require(not taken, "data.columns", self.columns, "one field per column")
