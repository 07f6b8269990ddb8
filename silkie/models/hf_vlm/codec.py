"""Prompt/answer token ids for transformers-native VLMs, through the checkpoint's own chat template.

Built the way TRL's `DPOTrainer` builds them for conversational vision data: the prompt is the user turn
(image first, then the text) rendered with the generation prompt, up to where a rendered assistant turn parts from
it (TRL's common prefix: a reasoning template's generation prompt may open a `<think>` the turn renders otherwise);
an answer is what rendering prompt + the assistant turn adds after the prompt text (e.g. `answer<|im_end|>\\n` for
Qwen2-VL). Both are tokenized without extra special tokens. Images and videos are content parts in the order
`media_segments` gives (a template may still render them where it likes: llava-hf's puts images first); each stays
one marker token here, which the collator expands to its feature-token count once its size is known. Where the
processor writes text around an image's tokens (Gemma 3's blank lines), the prompt holds that text with one feature
token as the marker (`ImageSpan`), so the text joins its neighbours as in the processor's ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, NamedTuple

from silkie.config.names import VIDEO_FAMILIES
from silkie.errors import InputError
from silkie.models.family import PairTextError
from silkie.models.media import MARKERS, Turns, as_keys, as_turns, media_segments, turn_media, user_texts


def load_processor(
    path: str,
    min_pixels: int | None,
    max_pixels: int | None,
    max_tiles: int | None = None,
    max_image_tokens: int | None = None,
) -> Any:
    """`AutoProcessor` of a checkpoint folder, with the recipe's per-image pixel bounds (Qwen2-VL), tile bound
    (InternVL) or soft-token budget (Gemma 4) applied; one shared object per folder and bounds (the codec's and the
    image processor's)."""
    return _cached_processor(path, min_pixels, max_pixels, max_tiles, max_image_tokens)


@functools.lru_cache(maxsize=8)
def _cached_processor(
    path: str, min_pixels: int | None, max_pixels: int | None, max_tiles: int | None, max_image_tokens: int | None
) -> Any:
    from transformers import AutoProcessor

    from .processors import load_image_only_processor

    processor = load_image_only_processor(path) or AutoProcessor.from_pretrained(path)
    if max_image_tokens is not None:
        if not hasattr(processor.image_processor, "max_soft_tokens"):
            raise InputError("model.max_image_tokens: only Gemma 4's processor takes a soft-token budget")
        processor.image_processor.max_soft_tokens = max_image_tokens
    if max_tiles is not None:
        if not hasattr(processor.image_processor, "max_patches"):
            raise InputError("model.max_tiles: only tiling processors (InternVL's) take a tile bound")
        processor.image_processor.max_patches = max_tiles
    if min_pixels is not None or max_pixels is not None:
        image = processor.image_processor
        if not hasattr(image, "merge_size"):
            raise InputError("model.min_pixels/max_pixels: only Qwen2-VL-style processors take pixel bounds")
        size = dict(image.size)
        size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
        size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(
                f"model.min_pixels ({size['shortest_edge']}) is above model.max_pixels ({size['longest_edge']})"
            )
        image.size = size
    return processor


class ImageSpan(NamedTuple):
    """What the processor writes for an image: the chat template's `placeholder` becomes `text`, in which `marker`
    (one feature token) stands for the image's feature tokens (Gemma 3: `<start_of_image>` ->
    "\\n\\n<start_of_image><image_soft_token><end_of_image>\\n\\n")."""

    placeholder: str
    text: str
    marker: str


SYSTEM_PROBE = "silkie-system-probe-7f3a"  # a system text that no template or prompt writes by itself
ANSWER_PROBE = "Silkie answer probe."  # an answer text to see where a template's assistant turn starts


def _without_markers(text: str) -> str:
    """The text less its `<image>` / `<video>` markers (llava-hf's image token is `<image>` itself)."""
    return MARKERS.sub("", text)


def _system_message(text: str, as_string: bool = False) -> dict:
    """A system message with its text as a content part (TRL's form), or `as_string` as the bare text."""
    return {"role": "system", "content": text if as_string else [{"type": "text", "text": text}]}


def _assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class ChatTemplateCodec:
    """`PairCodec` over an HF processor (tokenizer + chat template + image token)."""

    def __init__(
        self,
        processor: Any,
        image_token_budget: int,
        videos: Any = None,
        video_span_collapsed: bool = False,
        image_span: ImageSpan | None = None,
        template_kwargs: dict | None = None,
    ):
        self.processor = processor
        self.template_kwargs = dict(template_kwargs or {})  # the recipe's model.chat_template_kwargs
        self.tokenizer = processor.tokenizer
        self.image_token_budget = int(image_token_budget)
        self._image_span = image_span
        marker = image_span.marker if image_span else processor.image_token
        self.image_marker_id = self.tokenizer.convert_tokens_to_ids(marker)
        video_token = getattr(processor, "video_token", None) if videos is not None else None
        self.video_marker_id = self.tokenizer.convert_tokens_to_ids(video_token) if video_token else None
        self.videos = videos  # the family's video processor (`most_tokens`, `slice_key`); None: no video
        # Qwen3-VL: the template's span around a video collapses to the bare marker, which the collator replaces by
        # per-frame spans with timestamps (as Qwen3VLProcessor replaces the text)
        self._video_span = (
            f"{processor.vision_start_token}{video_token}{processor.vision_end_token}" if video_span_collapsed else None
        )
        delimiters = (getattr(processor, name, None) for name in ("start_image_token", "end_image_token"))  # InternVL
        decoder = self.tokenizer.added_tokens_decoder
        # the special tokens of an image span (Gemma 3's <start_of_image>, <image_soft_token>, <end_of_image>)
        # (whitespace-only ones never: a fine-tune may save Gemma's newline runs as special)
        span = image_span.text if image_span else ""
        span_tags = [t.content for t in decoder.values() if t.special and t.content.strip() and t.content in span]
        self._tags = [tag for tag in (processor.image_token, video_token, *delimiters, *span_tags) if tag]
        template = str(processor.chat_template or self.tokenizer.chat_template or "")
        specials = {*self.tokenizer.all_special_tokens, *self.tokenizer.get_added_vocab()}
        media = {processor.image_token, getattr(processor, "video_token", None)}  # markers, also of media it refuses
        # tokens only: Gemma's added tokens include its newline runs, which any text may hold
        self.template_markers = tuple(sorted(t for t in specials if t.strip() and t in template and t not in media))
        self._special_ids = frozenset(index for index, token in decoder.items() if token.special)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        # (template, renders a system message, takes it as a string: it writes a list of parts as their repr)
        self._system_probe: tuple[str | None, bool, bool] = (None, False, False)
        self._prompt_tail: tuple[str | None, str] = (None, "")  # (template, generation prompt text past the answer)

    def _refuse_video(self, videos: Any) -> None:
        if as_keys(videos) and self.video_marker_id is None:
            raise PairTextError(
                "video_unsupported", f"images only, not video (Silkie reads video for {' / '.join(VIDEO_FAMILIES)})"
            )

    def _messages(self, prompt: str, images: Any = (), videos: Any = (), history: Turns = ()) -> list[dict]:
        """The earlier turns and the user turn as chat messages, each user turn's media as content parts."""
        self._refuse_video(videos)
        texts = user_texts(prompt, history)
        return self._turn_messages(texts, turn_media(texts, images, videos), history)

    @staticmethod
    def _turn_messages(texts: list[str], media: list, history: Turns) -> list[dict]:
        """Chat messages of the user turns `texts` (their media placed: `turn_media`) and the answers between them."""
        answers = [answer for _, answer in history]
        messages: list[dict] = []
        for index, (text, (keys, clips)) in enumerate(zip(texts, media)):
            content = []
            for segment in media_segments(text, keys, clips):
                if segment.kind == "text":
                    content.append({"type": "text", "text": segment.value})
                else:
                    content.append({"type": segment.kind})
            if not content or content[-1]["type"] != "text":
                content.append({"type": "text", "text": ""})
            messages.append({"role": "user", "content": content})
            if index < len(answers):
                messages.append(_assistant_message(answers[index]))
        return messages

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(
        self,
        prompt: str,
        images: Any = (),
        videos: Any = (),
        system: str | None = None,
        history: Turns = (),
        generation: bool = False,
    ) -> str:
        """The rendered system turn (`system`, else the template's default) + earlier turns (`history`) + user turn
        + generation prompt (one placeholder per image / video; a pair's prompt ends where its answer starts, a
        prompt to `generation` from keeps the whole generation prompt); `PairTextError("system_unsupported")` when the
        template leaves a system message out or refuses one (llava-hf's writes it as text before `USER:`)."""
        return self._prompt_from(self._messages(prompt, images, videos, as_turns(history)), system, generation)

    def _prompt_from(self, messages: list[dict], system: str | None, generation: bool = False) -> str:
        """`messages` rendered after the system turn (`system`, else the template's default), with the generation
        prompt: whole for `generation`, else up to where the assistant turn's answer starts (`generation_tail`)."""
        if system is not None and not self._renders_system():
            raise PairTextError("system_unsupported", f"{type(self.processor).__name__}'s chat template leaves the "
                                "system message out (or refuses one)")  # fmt: skip
        if system is not None:
            messages = [_system_message(system, self._system_probe[2]), *messages]
        text = self._render(messages, True)
        tail = "" if generation else self.generation_tail
        return text[: -len(tail)] if tail and text.endswith(tail) else text

    @property
    def generation_tail(self) -> str:
        """What the generation prompt writes that a rendered assistant turn does not (e.g. a `<think>` that a
        reasoning template opens only when asked to generate): TRL's `DPOTrainer` ends the prompt where the two
        renderings part, so the prompt leaves it out and an answer is the rest of its assistant turn. Usually ""."""
        template = str(self.processor.chat_template or self.tokenizer.chat_template or "")
        if self._prompt_tail[0] != template:
            user = self._messages("x")
            prompt = self._render(user, True)
            full = self._render([*user, _assistant_message(ANSWER_PROBE)], False)
            common = os.path.commonprefix([prompt, full])
            self._prompt_tail = (template, prompt[len(common) :])
        return self._prompt_tail[1]

    def _renders_system(self) -> bool:
        """Whether the chat template renders a system message (probed once per template with a text no prompt holds;
        a template that raises on one, as Gemma 3's, does not). A template that writes a system message's list of
        content parts as its Python repr (gemma-4-31B-it's first release: `content | trim`) gets the bare text."""
        template = str(self.processor.chat_template or self.tokenizer.chat_template or "")
        if self._system_probe[0] != template:
            found = (False, False)
            for as_string in (False, True):
                try:
                    text = self._render([_system_message(SYSTEM_PROBE, as_string), *self._messages("x")], True)
                except Exception:  # jinja2's TemplateError from the template's raise_exception
                    continue
                if SYSTEM_PROBE in text and repr(SYSTEM_PROBE) not in text:
                    found = (True, as_string)
                    break
            self._system_probe = (template, *found)
        return self._system_probe[1]

    def prompt_ids(
        self,
        prompt: str,
        images: Any = (),
        videos: Any = (),
        system: str | None = None,
        history: Turns = (),
        generation: bool = False,
    ) -> list[int]:
        """Token ids of `prompt_text` (`generation`: the whole generation prompt); `PairTextError` when a text
        holds an image/video token itself (`image_tag_in_text`), markers do not match the media
        (`image_marker_mismatch`), the family takes no video (`video_unsupported`) or the template no system message
        (`system_unsupported`)."""
        history = as_turns(history)
        users = user_texts(prompt, history)
        media = turn_media(users, images, videos)  # markers that do not match the media: said first
        texts = [*map(_without_markers, users), *(answer for _, answer in history), system or ""]
        tag = next((tag for tag in self._tags for text in texts if tag in text), None)
        if tag is not None:
            raise PairTextError("image_tag_in_text", f"the prompt contains the model's media token {tag!r}")
        self._refuse_video(videos)
        text = self._prompt_from(self._turn_messages(users, media, history), system, generation)
        if self._video_span:  # the ids' one marker per video, as Qwen3VLProcessor collapses the text
            text = text.replace(self._video_span, self.processor.video_token)
        if self._image_span:  # the processor's text around each image, tokenized with the prompt's
            text = text.replace(self._image_span.placeholder, self._image_span.text)
        return self._ids(text)

    def video_token_budget(self, max_frames: int) -> int:
        """Most tokens a video of `max_frames` sampled frames takes (its frames at the largest size)."""
        return self.videos.most_tokens(max_frames) if self.videos is not None else 0

    def answer_ids(self, text: str) -> list[int]:
        """The assistant turn as rendered after a prompt (the template's end-of-turn tokens; EOS added when the
        template closes the turn with no special token of its own)."""
        user = self._messages("", None)
        prefix = self._prompt_from(user, None)
        full = self._render([*user, _assistant_message(text)], False)
        if not full.startswith(prefix):
            raise InputError(
                f"the chat template of {type(self.processor).__name__} renders an assistant turn that does not follow "
                "its own prompt (rendered with the generation prompt); TRL and Silkie need the prompt as a prefix"
            )
        ids = self._ids(full[len(prefix) :])
        eos = self.tokenizer.eos_token_id
        # llava-hf's template ends a turn with a space, not </s>: without a stop token the policy would never learn
        # where an answer ends. A turn closed by the template's own token (InternVL2.5's <|im_end|> where the
        # tokenizer's eos is </s>) has its stop; generation stops there too.
        if eos is not None and eos not in ids and not self._special_ids.intersection(ids):
            ids.append(eos)
        return ids

    def fingerprint(self) -> str:
        """Hash of the tokenizer (vocabulary, merges, special tokens), the chat template and the image token bound."""
        digest = hashlib.sha256(type(self.tokenizer).__qualname__.encode())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        digest.update((backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab())).encode())
        digest.update(str(self.processor.chat_template or self.tokenizer.chat_template).encode())
        digest.update(f"image tokens <= {self.image_token_budget}".encode())  # decides which pairs max_length drops
        digest.update(f"video slices {self.videos.slice_key() if self.videos is not None else None}".encode())
        if self._image_span:
            digest.update(f"image span {self._image_span.text!r}".encode())
        if self.template_kwargs:
            digest.update(f"template kwargs {json.dumps(self.template_kwargs, sort_keys=True)}".encode())
        if self._renders_system() and self._system_probe[2]:  # a system message goes as its bare text
            digest.update(b"system message as a string")
        if self.generation_tail:  # pairs whose answers open as the tail does are split as TRL splits them
            digest.update(b"answers that open with the generation prompt's tail: that part in the prompt")
        return digest.hexdigest()

    def save_pretrained(self, directory: str) -> Any:
        """Write the processor (tokenizer, chat template, image processor) next to the adapter."""
        return self.processor.save_pretrained(directory)
