"""Tokenization of preference pairs into a cached `datasets.Dataset`, through the model family's codec.

The codec (`silkie.models.family.PairCodec`) builds prompt ids (chat template, one marker per image / video, placed
at the prompt's `<image>` / `<video>` markers or first) and answer ids; for Qwen-VL-Chat the user query is
`Picture 1: <img>{image_key}</img>\\n...{prompt}`. In the trainer every answer token carries a label and the prompt
none. Dropped pairs are counted under `too_long` (truncation "drop"), `prompt_too_long`,
`identical_after_truncation` (truncation "answer"), `image_tag_in_text`, `chat_template_in_text` (a prompt or answer
that holds the chat template's own tokens: templated already), `bad_image_key`, `image_marker_mismatch`,
`video_unsupported` (a video for a family that takes none) or `system_unsupported` (a system message the template
leaves out).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

from silkie.data.pairs import PairReport, PreferencePair
from silkie.errors import InputError
from silkie.logs import get_logger
from silkie.models.family import PairCodec, PairTextError
from silkie.models.media import as_keys, as_turns
from silkie.models.qwen_vl.family import QwenVLCodec, format_query

__all__ = ["as_codec", "cache_key", "encode_pair", "format_query", "tokenize_pairs"]

logger = get_logger(__name__)

Truncation = Literal["drop", "answer"]
FORMAT_VERSION = "silkie-pairs-v3"  # v3: Qwen-VL prompts stripped; v2: images / videos lists (v1: one image)
STATS_FILE = "silkie_tokenize_stats.json"
PAIR_FIELDS = ("prompt_id", "prompt", "images", "videos", "chosen", "rejected", "chosen_score", "rejected_score")
DEFAULT_VIDEO_FRAMES = 64  # data.video_max_frames' default
FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "videos": datasets.List(datasets.Value("string")),
        "prompt_input_ids": datasets.List(datasets.Value("int32")),
        "chosen_input_ids": datasets.List(datasets.Value("int32")),
        "rejected_input_ids": datasets.List(datasets.Value("int32")),
        "prompt_length": datasets.Value("int32"),
        "chosen_length": datasets.Value("int32"),
        "rejected_length": datasets.Value("int32"),
        "length": datasets.Value("int32"),
        "chosen_score": datasets.Value("float32"),
        "rejected_score": datasets.Value("float32"),
        "drop_reason": datasets.Value("string"),
    }
)


_RECORD_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "videos": datasets.List(datasets.Value("string")),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "chosen_score": datasets.Value("float64"),
        "rejected_score": datasets.Value("float64"),
        "system": datasets.Value("string"),
        "history": datasets.List(datasets.List(datasets.Value("string"))),
    }
)


def as_codec(tokenizer: Any) -> PairCodec:
    """A family codec as is; a bare Qwen-VL tokenizer wrapped in its codec."""
    if hasattr(tokenizer, "prompt_ids"):
        return tokenizer
    return QwenVLCodec(tokenizer)


def _media_tokens(codec: Any, images: Sequence[str], videos: Sequence[str], video_frames: int) -> int:
    """The most tokens a pair's images and videos add to their markers when the collator expands them."""
    tokens = len(images) * codec.image_token_budget
    return tokens + len(videos) * codec.video_token_budget(video_frames) if videos else tokens


def trl_prompt_split(
    prompt_ids: list[int], whole: list[int], chosen_ids: list[int], rejected_ids: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """TRL's `DPOTrainer` split where the whole generation prompt (`whole`) writes more than the template's rendered
    assistant turn starts with (e.g. a reasoning template's `<think>`): its prompt is the whole prompt up to where it
    parts from prompt+chosen or from prompt+rejected, so when both answers open with (part of) that extra text, that
    part is the prompt's, not the answers'. `prompt_ids` ends where the rendered turn starts."""
    if whole[: len(prompt_ids)] != prompt_ids:
        return prompt_ids, chosen_ids, rejected_ids
    tail = whole[len(prompt_ids) :]
    shared = min(len(os.path.commonprefix([tail, chosen_ids])), len(os.path.commonprefix([tail, rejected_ids])))
    shared = min(shared, len(chosen_ids) - 1, len(rejected_ids) - 1)  # each answer keeps a token to score
    if shared <= 0:
        return prompt_ids, chosen_ids, rejected_ids
    return prompt_ids + tail[:shared], chosen_ids[shared:], rejected_ids[shared:]


def encode_pair(
    prompt: str,
    images: str | Sequence[str] | None,
    chosen: str,
    rejected: str,
    tokenizer: Any,
    max_length: int | None = None,
    truncation: Truncation = "drop",
    videos: Sequence[str] = (),
    video_frames: int = DEFAULT_VIDEO_FRAMES,
    system: str | None = None,
    history: Sequence[Sequence[str]] = (),
) -> tuple[dict[str, list[int]] | None, str | None]:
    """Token ids of one pair: ({prompt,chosen,rejected}_input_ids, None), or (None, drop reason).

    `tokenizer` is a family codec (or a Qwen-VL tokenizer); `system` the pair's system message (None: the
    template's default); `history` its earlier (user, assistant) turns. `max_length` bounds prompt (with the most tokens
    its images and videos of at most `video_frames` frames can take) + the longer answer. "drop" drops a pair over
    it (`too_long`); "answer" cuts both answers from the right and never cuts the prompt (`prompt_too_long` when
    the prompt alone leaves no room for an answer).
    """
    codec = as_codec(tokenizer)
    images, videos, history = as_keys(images), as_keys(videos), as_turns(history)
    texts = (prompt, chosen, rejected, system or "", *(text for turn in history for text in turn))
    if any(marker in text for marker in codec.template_markers for text in texts):
        return None, "chat_template_in_text"  # templated already: the template would wrap it a second time
    try:  # e.g. the Qwen-VL codec refuses image tags in text and an image key over 254 bytes
        prompt_ids = codec.prompt_ids(prompt, images, videos, system=system, history=history)
        chosen_ids = codec.answer_ids(chosen)
        rejected_ids = codec.answer_ids(rejected)
        if getattr(codec, "generation_tail", ""):  # TRL's split, pair by pair
            whole = codec.prompt_ids(prompt, images, videos, system=system, history=history, generation=True)
            prompt_ids, chosen_ids, rejected_ids = trl_prompt_split(prompt_ids, whole, chosen_ids, rejected_ids)
    except PairTextError as error:
        return None, error.reason
    for marker, count in ((codec.image_marker_id, len(images)), (codec.video_marker_id, len(videos))):
        if marker is None:
            continue
        if prompt_ids.count(marker) != count or marker in chosen_ids or marker in rejected_ids:
            return None, "image_tag_in_text"
    prompt_length = len(prompt_ids) + _media_tokens(codec, images, videos, video_frames)
    if max_length is not None and prompt_length + max(len(chosen_ids), len(rejected_ids)) > max_length:
        if truncation == "drop":
            return None, "too_long"
        budget = max_length - prompt_length
        if budget <= 0:
            return None, "prompt_too_long"
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        if chosen_ids == rejected_ids:
            return None, "identical_after_truncation"
    return {"prompt_input_ids": prompt_ids, "chosen_input_ids": chosen_ids, "rejected_input_ids": rejected_ids}, None


def _tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: Any, max_length: int | None, truncation: Truncation, video_frames: int
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in FEATURES}
    for index in range(len(batch["prompt_id"])):
        ids, reason = encode_pair(
            batch["prompt"][index],
            batch["images"][index],
            batch["chosen"][index],
            batch["rejected"][index],
            tokenizer,
            max_length,
            truncation,
            videos=batch["videos"][index],
            video_frames=video_frames,
            system=batch["system"][index],
            history=batch["history"][index],
        )
        ids = ids or {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
        lengths = {key: len(value) for key, value in ids.items()}
        out["prompt_id"].append(batch["prompt_id"][index])
        out["images"].append(batch["images"][index])
        out["videos"].append(batch["videos"][index])
        for key, value in ids.items():
            out[key].append(value)
        out["prompt_length"].append(lengths["prompt_input_ids"])
        out["chosen_length"].append(lengths["chosen_input_ids"])
        out["rejected_length"].append(lengths["rejected_input_ids"])
        out["length"].append(
            lengths["prompt_input_ids"] + max(lengths["chosen_input_ids"], lengths["rejected_input_ids"])
        )
        out["chosen_score"].append(batch["chosen_score"][index])
        out["rejected_score"].append(batch["rejected_score"][index])
        out["drop_reason"].append(reason or "")
    return out


def _pair_record(pair: PreferencePair | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(pair, PreferencePair):
        return pair.to_dict()
    record = {name: pair.get(name) for name in (*PAIR_FIELDS, "system")}
    record["history"] = [list(turn) for turn in pair.get("history") or ()]
    if isinstance(record["images"], list) and isinstance(record["videos"], list):
        return record  # already a record
    images = record["images"] if record["images"] is not None else pair.get("image")  # a one-image mapping
    return {**record, "images": list(as_keys(images)), "videos": list(as_keys(record["videos"]))}


def cache_key(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int | None,
    truncation: str,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
) -> str:
    """Hash of (pairs content, the codec's fingerprint (vocabulary, template), options, format version)."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, max_length, truncation, video_frames]).encode())
    digest.update(as_codec(tokenizer).fingerprint().encode())
    for record in map(_pair_record, records):
        values = [record[name] for name in PAIR_FIELDS]
        if record.get("system") is not None:  # only then: a cache (and a checkpoint's data fingerprint) of pairs
            values.append(record["system"])  # without one keeps its key
        if record.get("history"):  # the same: pairs without earlier turns keep their key
            values.append({"history": record["history"]})
        digest.update(json.dumps(values, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def _drops(stats: dict[str, Any]) -> str:
    """`too_long: 12 (first: id-7), video_unsupported: 2 (first: id-9)`."""
    firsts = stats.get("offending_ids", {})
    return ", ".join(
        f"{reason}: {n}" + (f" (first: {firsts[reason][0]})" if firsts.get(reason) else "")
        for reason, n in sorted(stats["dropped"].items())
    )


def _apply_stats(stats: dict[str, Any], report: PairReport | None, split: str) -> None:
    dropped = stats["dropped"]
    if dropped:
        logger.warning(
            f"{split}: {sum(dropped.values())} of {stats['total']} pairs dropped at tokenization: {_drops(stats)}"
        )
    if report is None:
        return
    for reason, count in dropped.items():
        report.record_later_drops(reason, count, stats["offending_ids"].get(reason, []))
    report.too_long_with_video += stats.get("too_long_with_video", 0)


def _tokenize(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int | None,
    truncation: Truncation,
    num_proc: int | None,
    fingerprint: str,
    video_frames: int,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    source = datasets.Dataset.from_list(records, features=_RECORD_FEATURES)
    options = {"tokenizer": tokenizer, "max_length": max_length, "truncation": truncation}
    mapped = source.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc and num_proc > 1 and len(records) > 1 else None,
        fn_kwargs={**options, "video_frames": video_frames},
        remove_columns=source.column_names,
        features=FEATURES,
        new_fingerprint=fingerprint,
        desc="tokenizing pairs",
    )
    reasons = mapped["drop_reason"]
    offending: dict[str, list[str]] = {}
    for prompt_id, reason in zip(mapped["prompt_id"], reasons):
        if reason and len(offending.setdefault(reason, [])) < 5:
            offending[reason].append(prompt_id)
    dropped = Counter(reason for reason in reasons if reason)
    with_video = sum(1 for r, videos in zip(reasons, mapped["videos"]) if r == "too_long" and videos) if dropped else 0
    # fingerprints named after the cache key, not hashed from this code: checkpoints record them (a resume on the
    # same data must match after an update of Silkie or datasets rebuilt the cache)
    if dropped:
        mapped = mapped.filter(lambda batch: [not r for r in batch], input_columns="drop_reason", batched=True,
                               new_fingerprint=f"{fingerprint}-kept")  # fmt: skip
    mapped = mapped.remove_columns("drop_reason", new_fingerprint=f"{fingerprint}-pairs")
    stats = {"total": len(records), "dropped": dict(dropped), "offending_ids": offending}
    return mapped, {**stats, "too_long_with_video": with_video}


def _save_to_cache(dataset: datasets.Dataset, stats: dict[str, Any], target: Path) -> datasets.Dataset:
    """Save atomically (staging folder + rename); if another process got there first, use its copy."""
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    (staging / STATS_FILE).write_text(json.dumps(stats), encoding="utf-8")
    if target.exists() and not (target / STATS_FILE).is_file():
        shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete entry
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / STATS_FILE).is_file():
            raise
    shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def _load_from_cache(target: Path) -> tuple[datasets.Dataset, dict[str, Any]] | None:
    """The cached dataset and its stats, or None when the entry is damaged (a truncated arrow file, a cut stats
    file): it is then moved out of the way, once across processes, so the pairs are tokenized again."""
    logger.debug("loading tokenized pairs from cache %s", target)
    try:
        return datasets.load_from_disk(str(target)), json.loads((target / STATS_FILE).read_text(encoding="utf-8"))
    except (ValueError, KeyError, OSError) as err:  # a cut arrow file (pyarrow's errors carry no errno), a cut
        # stats file (json), a missing one; other OSErrors (e.g. a stale NFS handle) are not the entry's fault
        if isinstance(err, OSError) and err.errno not in (None, errno.ENOENT):
            raise
        logger.warning("the tokenized-pairs cache %s is damaged (%s: %s): tokenizing again", target,
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")  # fmt: skip
        damaged = target.with_name(f"{target.name}.damaged-{os.getpid()}")
        try:
            os.rename(target, damaged)  # atomic: another process of the run may be doing the same
        except OSError:
            return None
        shutil.rmtree(damaged, ignore_errors=True)
        return None


def tokenize_pairs(
    pairs: Sequence[PreferencePair | Mapping[str, Any]],
    tokenizer: Any,
    max_length: int | None = None,
    truncation: Truncation = "drop",
    num_proc: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    report: PairReport | None = None,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
    split: str = "pairs",
) -> datasets.Dataset:
    """Tokenize pairs into a Dataset with `prompt_id`, `images`, `videos`, `{prompt,chosen,rejected}_input_ids`,
    lengths (`video_frames`: the most frames a video is sampled to, which bounds its tokens).

    With `cache_dir`, the result is saved under `cache_dir/<hash>` (hash of pairs, vocabulary bytes and options)
    and later calls load it instead of tokenizing again. Drops are logged (under `split`, e.g. "held-out split")
    and, with `report`, added to it. Raises `InputError` when no pair is left.
    """
    if truncation not in ("drop", "answer"):
        raise ValueError(f"truncation must be 'drop' or 'answer', got {truncation!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive or None, got {max_length}")
    records = [_pair_record(pair) for pair in pairs]
    if not records:
        raise ValueError("tokenize_pairs got no pairs")
    key = cache_key(records, tokenizer, max_length, truncation, video_frames)
    target = Path(cache_dir) / key if cache_dir is not None else None
    cached = _load_from_cache(target) if target is not None and (target / STATS_FILE).is_file() else None
    if cached is not None:
        dataset, stats = cached
    else:
        dataset, stats = _tokenize(records, tokenizer, max_length, truncation, num_proc, key, video_frames)
        if target is not None:
            dataset = _save_to_cache(dataset, stats, target)
    _apply_stats(stats, report, split)
    if len(dataset) == 0:
        lengths = ""
        if {"too_long", "prompt_too_long", "identical_after_truncation"} & set(stats["dropped"]):
            lengths = f"; max_length = {max_length}, truncation = {truncation}"
            lengths += _first_length(records, tokenizer, video_frames)
        raise InputError(f"{split}: no pair left after tokenization, all {stats['total']} dropped ({_drops(stats)}"
                         f"{lengths})")  # fmt: skip
    return dataset


def _first_length(records: Sequence[Mapping[str, Any]], tokenizer: Any, video_frames: int) -> str:
    """`; the first pair needs P + A tokens` when the first pair fits no limit only by length (what max_length to
    set is then a number, not a search)."""
    first = records[0]
    ids, reason = encode_pair(first["prompt"], first["images"], first["chosen"], first["rejected"], tokenizer,
                              max_length=None, videos=first["videos"], video_frames=video_frames,
                              system=first.get("system"), history=first.get("history") or ())  # fmt: skip
    if ids is None:
        return ""
    answer = max(len(ids["chosen_input_ids"]), len(ids["rejected_input_ids"]))
    prompt = len(ids["prompt_input_ids"]) + _media_tokens(as_codec(tokenizer), first["images"], first["videos"],
                                                          video_frames)  # fmt: skip
    return f"; the first pair needs {prompt + answer} tokens: prompt {prompt} (media included) + longer answer {answer}"
