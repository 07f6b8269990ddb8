"""Recipe `data:` section -> tokenized train/eval datasets, image store and a pair report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silkie.config import DataSection
from silkie.config.checks import changed_from_default
from silkie.data.embedded import MEDIA_DIR, EmbeddedMedia, WithEmbedded, is_embedded_key
from silkie.data.images import ImageLoadError, ImageStore, open_image_store
from silkie.data.pairs import MediaLimits, PairReport, build_vlfeedback_pairs, pairs_from_preference_rows
from silkie.data.sources import load_preference_file, load_vlfeedback_hf, load_vlfeedback_jsonl, prompt_key
from silkie.data.split import split_by_prompt
from silkie.errors import InputError, MissingInputError
from silkie.logs import get_logger

logger = get_logger(__name__)
# the keys that build pairs from ratings
RATING_RULES = ("aspect_weights", "min_margin", "max_pairs_per_prompt", "cap_strategy", "rating_rules")


@dataclass
class PreparedData:
    """Tokenized datasets (with a `pair_index` column), the image store and the report."""

    train: Any
    eval: Any | None
    image_store: ImageStore | None
    report: PairReport


def _load_rows(data: DataSection, key: str = "path", media: EmbeddedMedia | None = None) -> Any:
    """The rows of `data.path` (or of `data.eval_path`, with `key`), read as `data.source` says, those of its first
    `data.max_prompts` prompts (`media`: where pictures held in a preference file's rows are written)."""
    path = Path(getattr(data, key))
    keep = FirstPrompts(data.max_prompts) if data.max_prompts is not None and key == "path" else None
    if data.source == "vlfeedback":
        if not path.is_file():
            raise MissingInputError(f"data.{key}: VLFeedback jsonl not found: {path}")
        return load_vlfeedback_jsonl(path, keep=keep)
    if data.source == "hf":
        return load_vlfeedback_hf(getattr(data, key), split=data.split, key=f"data.{key}", keep=keep)
    if not path.exists():
        raise MissingInputError(f"data.{key}: preference file not found: {path}")
    splits = (data.split,) if key == "path" else ("test", "validation", "eval", "train")  # held-out: not train
    return load_preference_file(path, key=f"data.{key}", splits=splits, media=media, columns=data.columns, keep=keep)


def media_limits(data: DataSection) -> MediaLimits:
    """The recipe's most images / videos per pair."""
    return MediaLimits(max_images=data.max_images_per_pair, max_videos=data.max_videos_per_pair)


class FirstPrompts:
    """Whether a row is one of the first `count` prompts' (`prompt_key`: question or first turn + media; a file may
    hold several pairs each), asked row by row in file order."""

    def __init__(self, count: int):
        self.count = count
        self.keys: set[tuple] = set()

    def __call__(self, row: Any) -> bool:
        key = prompt_key(row)
        if key not in self.keys and len(self.keys) < self.count:
            self.keys.add(key)
        return key in self.keys


def build_pairs(
    data: DataSection, media_dir: str | Path | None = None
) -> tuple[list, list, ImageStore | None, PairReport]:
    """Load the source, build preference pairs as the recipe says and split them by prompt; pictures held in the
    rows are written to `media_dir` (without one such rows are dropped as `embedded_media`)."""
    store = open_image_store(data.images) if data.images else None
    # pictures the rows hold that `silkie prepare` wrote into a data.images folder are read from there
    elsewhere = [data.images] if data.images and Path(data.images).is_dir() else []
    media = EmbeddedMedia(media_dir, elsewhere) if media_dir is not None else None
    rows = _load_rows(data, media=media)
    eval_rows = _load_rows(data, "eval_path", media) if data.eval_path is not None else None
    if store is None:
        _check_no_media(rows, data.path)
        if eval_rows is not None:
            _check_no_media(eval_rows, data.eval_path)
    if media is not None and media.keys_given:
        store = WithEmbedded(media.folder, store, elsewhere)
    ignored = unused_rating_rules(data) if data.source == "preference" else []
    if ignored:
        logger.warning(
            f"data.source preference reads its pairs as given: {', '.join(ignored)} (rules that build pairs from "
            "ratings, for vlfeedback and hf) are ignored"
        )
    pairs, report = pairs_for(rows, data, store, data.path)
    if eval_rows is None:
        train, evaluation = split_by_prompt(
            pairs, eval_fraction=data.eval_fraction, eval_size=data.eval_size, seed=data.seed, rule=data.eval_split
        )
        return train, evaluation, store, report
    evaluation, eval_report = pairs_for(eval_rows, data, store, data.eval_path)
    logger.info(f"held-out pairs from data.eval_path: {eval_report.summary()}")
    shared = set(map(prompt_key, pairs)) & set(map(prompt_key, evaluation))
    if shared:  # the same question and media on both sides: the held-out score is partly a training score
        logger.warning(f"data.eval_path shares {len(shared)} prompts (question or first turn, and media) with "
                       "data.path")  # fmt: skip
    return pairs, evaluation, store, report


def _check_no_media(rows: Any, path: str) -> None:
    """`InputError` when rows reference image or video files but the recipe names no `data.images` to read them
    from (pictures the rows hold need none)."""
    for row in rows:
        files = [key for key in row.images + row.videos if not is_embedded_key(key)]
        if files:
            raise InputError(
                f"data.images is not set, but {path} references images or videos (row {row.id}: {files[0]}); set "
                "data.images to the zip or folder that holds them"
            )


def pairs_for(rows: Any, data: DataSection, store: ImageStore | None, source: str) -> tuple[list, PairReport]:
    """The rows' pairs under the recipe's rules (a preference file's as given); `silkie prepare` reports these."""
    if data.source == "preference":
        return pairs_from_preference_rows(rows, image_store=store, source=source, limits=media_limits(data))
    return build_vlfeedback_pairs(
        rows,
        aspect_weights=data.aspect_weights,
        min_margin=data.min_margin,
        max_pairs_per_prompt=data.max_pairs_per_prompt,
        cap_strategy=data.cap_strategy,
        seed=data.seed,
        image_store=store,
        source=source,
        limits=media_limits(data),
        rating_rules=data.rating_rules,
    )


def check_video_decoder(pairs: list) -> None:
    """`InputError` when pairs hold videos and PyAV, which decodes them, is not installed (else every such pair
    would be left out one warning at a time while the run goes on)."""
    import importlib.util

    with_video = [pair for pair in pairs if pair.videos]
    if with_video and importlib.util.find_spec("av") is None:
        raise InputError(
            f"{len(with_video)} pairs hold videos (the first: {with_video[0].prompt_id}: {with_video[0].videos[0]}); "
            "decoding them needs PyAV: pip install av"
        )


MEDIA_PROBE = 16  # pictures decoded before training: if none of them loads, the run would train on nothing


def check_images_decode(pairs: list, store: Any, images_key: str = "data.images") -> None:
    """`InputError` when none of the first `MEDIA_PROBE` distinct pictures of `pairs` decodes (a wrong archive, a
    folder of broken files): else each pair would get weight 0 and the run would finish having learned nothing.
    Some broken pictures are fine: their pairs are left out as the collator meets them."""
    keys = list(dict.fromkeys(key for pair in pairs for key in pair.images))[:MEDIA_PROBE]
    if not keys or store is None:
        return
    failures = []
    for key in keys:
        try:
            store.open(key)
        except ImageLoadError as err:
            failures.append(err)
        else:
            return
    tried = "the one picture" if len(keys) == 1 else f"each of the first {len(keys)} pictures"
    raise InputError(
        f"{tried} of the training pairs fails to load from {images_key} ({store}); the first: {failures[0]}; "
        "a run would learn nothing"
    )


def unused_rating_rules(data: DataSection) -> list[str]:
    """The recipe's pair-building rules set away from their defaults (`data.min_margin = 1.0`, ...): they act on
    rated completions, so a preference file's ready pairs never meet them."""
    return [f"data.{name} = {getattr(data, name)!r}" for name in changed_from_default(data, RATING_RULES)]


def prepare_data(data: DataSection, tokenizer: Any, max_length: int, cache_dir: str | Path) -> PreparedData:
    """Pairs -> tokenized `datasets.Dataset`s (cached on disk), each row with its `pair_index`."""
    from silkie.data.formatting import tokenize_pairs

    train_pairs, eval_pairs, store, report = build_pairs(data, Path(cache_dir) / MEDIA_DIR)
    if getattr(tokenizer, "video_marker_id", None) is not None:  # a family that takes video (else: video_unsupported)
        check_video_decoder(train_pairs + eval_pairs)
    check_images_decode(train_pairs, store)

    def tokenize(pairs: list, split: str) -> Any:
        dataset = tokenize_pairs(
            pairs,
            tokenizer,
            max_length=max_length,
            truncation=data.truncation,
            num_proc=data.num_proc,
            cache_dir=cache_dir,
            report=report,
            video_frames=data.video_max_frames,
            split=split,
        )
        return dataset.add_column("pair_index", list(range(len(dataset))), new_fingerprint=f"{dataset._fingerprint}-i")

    train = tokenize(train_pairs, "training split")
    evaluation = tokenize(eval_pairs, "held-out split") if eval_pairs else None
    return PreparedData(train=train, eval=evaluation, image_store=store, report=report)
