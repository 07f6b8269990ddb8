"""Answers about images (Qwen2-VL: and videos), streamed token by token (base, adapter, or both); several turns with
a history for Qwen-VL-Chat (its make_context: earlier turns kept while they fit in max_window_size). The inputs
are built in `chat_inputs`."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from silkie.models.generation import pad_token_id, stop_token_ids
from silkie.models.qwen_vl.tokenization import DEFAULT_SYSTEM
from silkie.tools.chat_inputs import (
    FamilyPrompter,
    Paths,
    Turn,
    as_paths,
    build_prompt_ids,
    family_inputs,
    image_query,
    image_reference,
    marked_question,
    qwen_vl_inputs,
    qwen_vl_tokenizer,
)
from silkie.tools.cli import ToolError, read_image, require_file

EMPTY_MARK = "(empty)"  # printed where the answer has no visible text; the returned answer stays as generated
__all__ = ["build_prompt_ids", "chat_once", "converse", "read_history", "write_history"]

BASE_LABEL = "=== base model (adapter disabled) ==="
DPO_LABEL = "=== DPO model (with adapter) ==="


@dataclass
class GenerationOptions:
    """Decoding settings: greedy unless `sample`."""

    max_new_tokens: int = 256
    sample: bool = False
    top_p: float = 0.8
    temperature: float = 1.0
    seed: int = 0


def read_history(path: str | Path) -> list[Turn]:
    """Earlier turns from a JSON file: a list of {"user": ..., "assistant": ... or null} (what --save-history writes;
    for Qwen2-VL / LLaVA also "images" / "videos": the turn's files, placed by its markers) or of [user, assistant]
    pairs; ToolError naming the file and the entry otherwise."""
    path = require_file(path, "history file")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ToolError(f"history file {path} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise ToolError(f"history file {path}: expected a list of turns, got {type(entries).__name__}")
    turns = []
    for index, entry in enumerate(entries):
        pair = (entry.get("user"), entry.get("assistant")) if isinstance(entry, dict) else entry
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)) or not (
            pair[1] is None or isinstance(pair[1], str)
        ):
            raise ToolError(
                f'history file {path}: entry {index} must be {{"user": text, "assistant": text or null}} or '
                "[user, assistant]"
            )
        unknown = sorted(set(entry) - {"user", "assistant", "images", "videos"}) if isinstance(entry, dict) else []
        if unknown:
            raise ToolError(f"history file {path}: entry {index} has {', '.join(unknown)} (expected user, assistant, "
                            "images, videos)")  # fmt: skip
        media = tuple(entry.get(kind) or [] for kind in ("images", "videos")) if isinstance(entry, dict) else ((), ())
        if not all(isinstance(items, list | tuple) and all(isinstance(i, str) for i in items) for items in media):
            raise ToolError(f"history file {path}: entry {index}'s images / videos must be lists of file paths")
        turns.append((pair[0], pair[1], *map(tuple, media)) if any(media) else (pair[0], pair[1]))
    return turns


def write_history(path: str | Path, turns: Iterable[Turn]) -> None:
    """The conversation as JSON turns, readable by `read_history` (replaced whole: never left half-written)."""
    records = []
    for user, assistant, *media in turns:
        media_lists = {kind: list(items) for kind, items in zip(("images", "videos"), media) if items}
        records.append({"user": user, "assistant": assistant, **media_lists})
    staged = Path(f"{path}.tmp")
    staged.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    staged.replace(path)


def generate_kwargs(
    tokenizer: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | dict | None,
    options: GenerationOptions,
    model: torch.nn.Module | None = None,
) -> dict:
    """Keyword arguments of `model.generate` for one prompt (greedy, or nucleus sampling).

    `pixel_values` is the image tensor, or a dict of the family's image inputs (e.g. + `image_grid_thw`); `model`'s
    own stop tokens (its generation config's) stop it too.
    """
    if pixel_values is None:
        pixel_values = {}
    images = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **images,
        max_new_tokens=options.max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=pad_token_id(tokenizer),
        do_sample=options.sample,
    )
    if options.sample:
        kwargs.update(top_p=options.top_p, temperature=options.temperature)
    return kwargs


def stream_answer(
    model: torch.nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    options: GenerationOptions,
    write: Callable[[str], Any] | None = None,
) -> str:
    """Generate in a thread and `write` each decoded piece as it arrives; returns the whole answer."""
    from transformers import TextIteratorStreamer

    write = write or _stdout_write
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            torch.manual_seed(options.seed)
            with torch.no_grad():
                model.generate(**generate_kwargs(tokenizer, input_ids, pixel_values, options, model), streamer=streamer)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        write(piece)
    thread.join()
    if failure:
        raise failure[0]
    answer = "".join(pieces)
    if not answer.strip():  # the model stopped at once (a tiny random stand-in often does): say so, not a blank line
        write(EMPTY_MARK)
    return answer


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def answer_with_labels(
    model: torch.nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    options: GenerationOptions,
    compare: bool,
    write: Callable[[str], Any] | None = None,
) -> dict[str, str]:
    """Stream one answer, or with `compare` the base answer (adapter disabled) then the DPO answer."""
    write = write or _stdout_write
    if not compare:
        answer = stream_answer(model, tokenizer, input_ids, pixel_values, options, write)
        write("\n")
        return {"answer": answer}
    if not hasattr(model, "disable_adapter"):
        raise ToolError("--compare needs --adapter (the base answer is the model with the adapter disabled)")
    answers = {}
    for name, label, context in (
        ("base", BASE_LABEL, model.disable_adapter()),
        ("dpo", DPO_LABEL, nullcontext()),
    ):
        write(label + "\n")
        with context:
            answers[name] = stream_answer(model, tokenizer, input_ids, pixel_values, options, write)
        write("\n\n" if name == "base" else "\n")
    return answers


@dataclass
class ChatModel:
    """A loaded model (+ adapter) for answering, with where and how it runs."""

    model: torch.nn.Module
    config: Any
    family: str
    device: torch.device
    dtype: torch.dtype
    model_dir: str | Path
    adapter_dir: str | Path | None

    def to_device(self, images: dict) -> dict:
        """Image inputs on the model's device (floating ones in its dtype)."""
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in images.items()
        }


def load_chat_model(
    model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: str = "auto", device: str = "auto"
) -> ChatModel:
    """Load the base model (+ adapter) for answering; the family comes from the folder's config.json."""
    from silkie.tools.common import family_of, load_model, resolve_device, resolve_tool_dtype

    torch_dtype = resolve_tool_dtype(dtype)
    target = resolve_device(device)
    model = load_model(model_dir, adapter_dir, dtype=torch_dtype).to(target)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return ChatModel(model, config, family_of(model_dir), target, torch_dtype, model_dir, adapter_dir)


def chat_once(
    model_dir: str | Path,
    image: Paths,
    question: str,
    adapter_dir: str | Path | None = None,
    options: GenerationOptions | None = None,
    compare: bool = False,
    system: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    write: Callable[[str], Any] | None = None,
    history: Iterable[Turn] = (),
    videos: Paths = None,
) -> dict[str, str]:
    """Load the model (+adapter), build the prompt, stream the answer(s) to `write`; returns them by name.

    `image`: one picture or several (in order; placed by `<image>` markers in the question, else first); `videos`
    (Qwen2-VL families) likewise. `system`: the system message (None: the family's default, as in training);
    `history`: earlier turns (`read_history`), rendered as training renders a pair's."""
    if compare and adapter_dir is None:
        raise ToolError("--compare needs --adapter (the base answer is the model with the adapter disabled)")
    for path in as_paths(image):
        read_image(path)  # a bad image fails before the model loads
    history = list(history)
    chat = load_chat_model(model_dir, adapter_dir, dtype, device)
    options = options or GenerationOptions()
    if chat.family == "qwen_vl":
        if as_paths(videos):
            raise ToolError("--video: Qwen-VL-Chat takes images, not video (the Qwen2-VL / 2.5-VL / 3-VL families do)")
        tokenizer = qwen_vl_tokenizer(chat)
        input_ids, images = qwen_vl_inputs(
            chat, tokenizer, image, question, DEFAULT_SYSTEM if system is None else system, history
        )
    else:
        tokenizer, input_ids, images = family_inputs(
            model_dir, adapter_dir, chat.config, image, videos, question, system, history
        )
    images = chat.to_device(images)
    return answer_with_labels(chat.model, tokenizer, input_ids.to(chat.device), images, options, compare, write)


def converse(
    model_dir: str | Path,
    questions: Iterable[str],
    image: Paths = None,
    adapter_dir: str | Path | None = None,
    history: Iterable[Turn] = (),
    options: GenerationOptions | None = None,
    system: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    write: Callable[[str], Any] | None = None,
    on_turn: Callable[[list[Turn]], Any] | None = None,
    videos: Paths = None,
) -> list[Turn]:
    """Several turns: each question is answered after the earlier turns (its pictures and videos, when given, go
    with the first one); returns the whole conversation (history included). `system`: None is the family's
    default. `on_turn` gets the conversation after every answer (e.g. to save it, so that an interrupted session
    keeps its finished turns)."""
    write = write or _stdout_write
    for path in as_paths(image):
        read_image(path)  # a bad image fails before the model loads
    turns = list(history)
    chat = load_chat_model(model_dir, adapter_dir, dtype, device)
    options = options or GenerationOptions()
    if chat.family == "qwen_vl":
        if as_paths(videos):
            raise ToolError("--video: Qwen-VL-Chat takes images, not video (the Qwen2-VL / 2.5-VL / 3-VL families do)")
        tokenizer = qwen_vl_tokenizer(chat)
        sources = {image_reference(path): path for path in as_paths(image)}
    else:
        prompter = FamilyPrompter(model_dir, adapter_dir, chat.config)
    for number, question in enumerate(questions):
        pictures, clips = (image, videos) if number == 0 else (None, None)
        files = tuple(tuple(str(Path(p).resolve()) for p in as_paths(items)) for items in (pictures, clips))
        if chat.family == "qwen_vl":  # the query names its pictures
            told = DEFAULT_SYSTEM if system is None else system
            input_ids, images = qwen_vl_inputs(chat, tokenizer, pictures, question, told, turns, sources)
            asked, files = image_query(pictures, question, turns), ((), ())
        else:  # the question marks its pictures and videos, which the turn lists
            tokenizer, input_ids, images = prompter(pictures, clips, question, system, turns)
            asked = marked_question(question, pictures, clips)
        answer = stream_answer(chat.model, tokenizer, input_ids.to(chat.device), chat.to_device(images), options, write)
        write("\n")
        turns.append((asked, answer, *files) if any(files) else (asked, answer))
        if on_turn is not None:
            on_turn(turns)
    return turns
