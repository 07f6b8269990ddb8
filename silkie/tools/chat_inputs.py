"""What `silkie chat` feeds the model: the prompt ids and image/video tensors of a question with its pictures (and,
for Qwen2-VL, videos), per family, built as training builds them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from silkie.models.media import IMAGE_MARKER, VIDEO_MARKER, marker_mismatch
from silkie.models.qwen_vl.tokenization import DEFAULT_SYSTEM, IMG_START, MAX_IMAGE_PATH_BYTES
from silkie.tools.cli import ToolError, read_config, read_image, require_file

# Qwen-VL-Chat: (query as the model saw it, its pictures named in it; response, None: the user turn alone). The other
# families: (question with an `<image>` / `<video>` marker per item, answer, image paths, video paths).
Turn = tuple
Paths = str | Path | Sequence[str | Path] | None


def as_paths(paths: Any) -> list[str | Path]:
    """One path, several, or none as a list."""
    if paths is None:
        return []
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def image_reference(path: str | Path) -> str:
    """The text inside `<img>...</img>`: the path as given, or its file name when over the 254-byte limit."""
    text = str(path)
    if len(text.encode("utf-8")) <= MAX_IMAGE_PATH_BYTES:
        return text
    name = Path(text).name
    return name if len(name.encode("utf-8")) <= MAX_IMAGE_PATH_BYTES else "image"


def marked_question(question: str, images: Paths = None, videos: Paths = None) -> str:
    """The question with a marker for each picture (video) of a kind it places none of, first, where training puts
    them: the same prompt, and one that stays right as an earlier turn."""
    images_first = "" if IMAGE_MARKER in question else IMAGE_MARKER * len(as_paths(images))
    return images_first + ("" if VIDEO_MARKER in question else VIDEO_MARKER * len(as_paths(videos))) + question


def family_turns(history: Iterable[Turn]) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """Earlier turns of a Qwen2-VL / LLaVA conversation as (question, answer, images, videos), each question with a
    marker per item; `ToolError` naming the turn for one without its answer or whose markers miscount its items."""
    turns = []
    for index, turn in enumerate(history):
        user, answer, images, videos = (*turn, (), ())[:4]
        if answer is None:
            raise ToolError(f"history turn {index} has no answer (only Qwen-VL-Chat's history takes a user turn alone)")
        turns.append(
            (_marked_turn(user, images, videos, f"history turn {index}"), answer, *map(_paths, (images, videos)))
        )
    return turns


def _marked_turn(question: str, images: Paths, videos: Paths, where: str) -> str:
    """`marked_question`, with a `ToolError` naming `where` when the question's markers of a kind miscount its
    items (each turn places its own: a miscount must not move a picture into another turn)."""
    marked = marked_question(question, images, videos)
    mismatch = marker_mismatch(marked, as_paths(images), as_paths(videos))
    if mismatch is not None:
        raise ToolError(f"{where}: {mismatch}")
    return marked


def _paths(paths: Paths) -> tuple[str, ...]:
    return tuple(str(path) for path in as_paths(paths))


def qwen_vl_turns(history: Iterable[Turn]) -> list[tuple[str, str | None]]:
    """Earlier turns of a Qwen-VL-Chat conversation as (query, response); `ToolError` for one with pictures beside
    its text (Qwen-VL-Chat's queries name their pictures: `Picture 1: <img>PATH</img>`)."""
    turns = []
    for index, turn in enumerate(history):
        if any(turn[2:]):
            raise ToolError(f"history turn {index} has images or videos beside its text: Qwen-VL-Chat's turns name "
                            "their pictures in it (Picture 1: <img>PATH</img>)")  # fmt: skip
        turns.append((turn[0], turn[1]))
    return turns


def check_history(history: list[Turn], model_dir: str | Path) -> None:
    """`ToolError` naming the turn of an earlier-turns list the model folder's family cannot take (see
    `family_turns`, `qwen_vl_turns`) or whose image or video file is missing."""
    from silkie.tools.common import family_of

    if family_of(model_dir) == "qwen_vl":
        qwen_vl_turns(history)
        return
    for index, (_, _, images, videos) in enumerate(family_turns(history)):
        for path in (*images, *videos):
            require_file(path, f"history turn {index}'s file")


def image_query(images: Paths, question: str, history: Iterable[Turn] = ()) -> str:
    """The query text as training formats it: `Picture k: <img>PATH</img>\\n` per picture at the question's
    `<image>` markers, else first (the original's from_list_format), then the question, k counting on from the
    pictures of the earlier turns (`history`); `ToolError` when the markers and pictures disagree."""
    from silkie.models.family import PairTextError
    from silkie.models.qwen_vl.family import format_query

    first = 1 + sum(query.count(IMG_START) for query, _ in history)
    try:
        return format_query(question, [image_reference(path) for path in as_paths(images)], first=first)
    except PairTextError as err:
        raise ToolError(f"qwen_vl: {err}") from err


def build_prompt_ids(
    tokenizer: Any, images: Paths, question: str, system: str = DEFAULT_SYSTEM, history: Iterable[Turn] = ()
) -> list[int]:
    """Qwen-VL-Chat prompt ids: the query (with its pictures) after the earlier turns, in the ChatML context."""
    history = qwen_vl_turns(history)
    return tokenizer.build_chat_context(image_query(images, question, history), history, system=system)


def qwen_vl_tokenizer(chat: Any) -> Any:
    """The run's Qwen-VL tokenizer (the adapter folder's copy when it has one)."""
    from silkie.tools.common import load_tokenizer_from

    return load_tokenizer_from(chat.model_dir, chat.adapter_dir)


def qwen_vl_inputs(
    chat: Any,
    tokenizer: Any,
    images: Paths,
    question: str,
    system: str,
    history: list,
    sources: dict[str, str | Path] | None = None,
) -> tuple:
    """(prompt ids [1, L], image inputs): every picture the prompt's `<img>` spans name, in order, read from its
    path as the original does (`sources`: the file behind a shortened reference, e.g. an --image file)."""
    from silkie.models.qwen_vl import QWenVLImageProcessor

    ids = build_prompt_ids(tokenizer, images, question, system, history)
    sources = {**(sources or {}), **{image_reference(path): path for path in as_paths(images)}}
    paths = tokenizer.image_paths(ids)  # history turns beyond max_window_size are gone, with their pictures
    if not paths:
        return torch.tensor([ids]), {}
    pictures = [read_image(sources.get(path, path)) for path in paths]
    return (
        torch.tensor([ids]),
        {"pixel_values": QWenVLImageProcessor(chat.config.visual["image_size"])(pictures)},
    )


def run_recipe(adapter_dir: Any) -> Any:
    """The recipe of the run an adapter belongs to (RUN/adapter or RUN/checkpoint-N beside RUN/config.yaml), or
    None: chat then processes images and videos as that run did (pixel bounds, video frames)."""
    from silkie.config import load_recipe
    from silkie.run_dir import CONFIG_NAME

    if adapter_dir is None or not (Path(adapter_dir).parent / CONFIG_NAME).is_file():
        return None
    return read_config(load_recipe, Path(adapter_dir).parent / CONFIG_NAME)


def read_video(path: str | Path, config: Any, family: str, data: Any = None) -> Any:
    """A video file's frames as training samples them (the run's `data.video_*` keys, else the recipe defaults:
    2 fps, 4-64 frames); `ToolError` naming the file when it cannot be decoded."""
    from silkie.config import DataSection
    from silkie.data.images import ImageLoadError
    from silkie.data.video import decode_video
    from silkie.train.build import video_sampling

    path = require_file(path, "video file")
    try:
        return decode_video(str(path), path.read_bytes(), video_sampling(data or DataSection(), config, family))
    except ImageLoadError as err:
        raise ToolError(str(err)) from err


class FamilyPrompter:
    """Qwen2-VL / LLaVA prompt inputs of one model folder (+ adapter): the codec and the image/video processor,
    with the adapter's run's pixel bounds and video frames, loaded once for any number of questions."""

    def __init__(self, model_dir: Any, adapter_dir: Any, config: Any, template_kwargs: dict | None = None):
        from silkie.config import ModelSection
        from silkie.models.family import get_family
        from silkie.tools.common import family_of, load_codec_from

        self.family, self.config = family_of(model_dir), config
        self.recipe = run_recipe(adapter_dir)
        section = ModelSection(path=str(model_dir), family=self.family)
        if self.recipe is not None:  # the run's pixel bounds
            section = dataclasses.replace(self.recipe.model, path=str(model_dir), family=self.family)
        if template_kwargs is not None:  # a pool model's own (`silkie annotate`)
            section = dataclasses.replace(section, chat_template_kwargs=template_kwargs)
        self.codec = load_codec_from(model_dir, adapter_dir, section=section)
        self.family_impl = get_family(self.family)
        self.processor = self.family_impl.image_processor(config, section)

    def __call__(
        self, images: Paths, videos: Paths, question: str, system: str | None = None, history: Iterable[Turn] = ()
    ) -> tuple:
        """(tokenizer, prompt ids [1, L], image/video tensors): the earlier turns (`history`, with their pictures and
        videos) and the question, pictures and videos placed by `<image>` / `<video>` markers, else first, each
        marker expanded to its feature-token count as the collator does; `system`: the system message (None: the
        template's default)."""
        from silkie.data.collator import PairCollator
        from silkie.models.family import ImageBatch, PairTextError

        turns = family_turns(history)
        question = _marked_turn(question, images, videos, "the question") if turns else question
        images = [*(path for turn in turns for path in turn[2]), *map(str, as_paths(images))]
        videos = [*(path for turn in turns for path in turn[3]), *map(str, as_paths(videos))]
        config, earlier = self.config, [(user, answer) for user, answer, _, _ in turns]
        try:
            prompt = self.codec.prompt_ids(question, images, videos, system, history=earlier, generation=True)
        except PairTextError as err:
            raise ToolError(f"{self.family}: {err}") from err
        pictures = [read_image(path) for path in images]
        clips = [read_video(path, config, self.family, self.recipe.data if self.recipe else None) for path in videos]
        processed = self.processor(pictures, videos=clips) if clips else self.processor(pictures)
        processed = processed if isinstance(processed, ImageBatch) else ImageBatch({"pixel_values": processed})
        (ids,) = PairCollator._expanded([prompt], processed, [len(pictures)], [len(clips)])
        # a modality with no media has empty tensors, which generate() would still encode (an empty torch.cat)
        tensors = {name: t for name, t in processed.tensors.items() if not (torch.is_tensor(t) and t.numel() == 0)}
        markers = {self.codec.image_marker_id: 0, self.codec.video_marker_id: 1}
        tensors = self.family_impl.generation_inputs(tensors, [markers[t] for t in prompt if t in markers])
        input_ids = torch.tensor([ids])
        # per-token inputs: the modality of each token (M-RoPE; Gemma 3's images attended both ways)
        tensors |= self.family_impl.token_kwargs(config, input_ids)
        return self.codec.tokenizer, input_ids, tensors


def family_inputs(
    model_dir: Any,
    adapter_dir: Any,
    config: Any,
    images: Paths,
    videos: Paths,
    question: str,
    system: str | None = None,
    history: Iterable[Turn] = (),
) -> tuple:
    """Qwen2-VL / LLaVA: (tokenizer, prompt ids [1, L], image/video tensors) of a question after its earlier turns
    (`FamilyPrompter`)."""
    return FamilyPrompter(model_dir, adapter_dir, config)(images, videos, question, system, history)


class PromptBuilder:
    """One loaded model's prompt inputs for any number of single-turn questions, every family: the Qwen-VL-Chat
    tokenizer, or the other families' codec and processor (loaded at the first question)."""

    def __init__(self, chat: Any, template_kwargs: dict | None = None):
        self.chat, self.template_kwargs = chat, template_kwargs  # the chat template's variables (null: the run's)
        self.tokenizer = qwen_vl_tokenizer(chat) if chat.family == "qwen_vl" else None
        self.prompter: FamilyPrompter | None = None

    def __call__(self, images: Paths, question: str, system: str = DEFAULT_SYSTEM) -> tuple:
        """(tokenizer, prompt ids [1, L], image tensors) of one question about its pictures (one path or several)."""
        if self.tokenizer is not None:
            ids, tensors = qwen_vl_inputs(self.chat, self.tokenizer, images, question, system, [])
            return self.tokenizer, ids, tensors
        if self.prompter is None:
            self.prompter = FamilyPrompter(
                self.chat.model_dir, self.chat.adapter_dir, self.chat.config, self.template_kwargs
            )
        return self.prompter(images, [], question)
