"""Prompt/answer token ids for transformers-native VLMs, through the checkpoint's own chat template.

Built the way TRL's `DPOTrainer` builds them for conversational vision data: the prompt is the user turn
(image first, then the text) rendered with the generation prompt; an answer is what rendering prompt + the
assistant turn adds after the prompt text (e.g. `answer<|im_end|>\\n` for Qwen2-VL). Both are tokenized
without extra special tokens. The image stays one marker token here; the collator expands it to the image's
feature-token count once the image's size is known.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from silkie.errors import InputError


@functools.lru_cache(maxsize=8)
def load_processor(path: str, min_pixels: int | None, max_pixels: int | None) -> Any:
    """`AutoProcessor` of a checkpoint folder, with the recipe's per-image pixel bounds applied (Qwen2-VL)."""
    from transformers import AutoProcessor

    from .processors import register_qwen2_vl_processor

    register_qwen2_vl_processor()  # without torchvision, Qwen2-VL's processor loads image-only
    processor = AutoProcessor.from_pretrained(path)
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


class ChatTemplateCodec:
    """`PairCodec` over an HF processor (tokenizer + chat template + image token)."""

    def __init__(self, processor: Any, image_token_budget: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_budget = int(image_token_budget)
        self.image_marker_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _user(self, prompt: str, image: str | None) -> list[dict]:
        content = [{"type": "image"}] if image else []
        return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, prompt: str, image: str | None) -> str:
        """The rendered user turn + generation prompt (one image placeholder when there is an image)."""
        return self._render(self._user(prompt, image), True)

    def prompt_ids(self, prompt: str, image: str | None) -> list[int]:
        """Token ids of `prompt_text`; ValueError when the prompt text holds the image token itself."""
        if self.processor.image_token in prompt:
            raise ValueError(f"the prompt contains the image token {self.processor.image_token!r}")
        return self._ids(self.prompt_text(prompt, image))

    def answer_ids(self, text: str) -> list[int]:
        """The assistant turn as rendered after a prompt (the template's end-of-turn tokens; EOS added if absent)."""
        user = self._user("", None)
        prefix = self._render(user, True)
        full = self._render([*user, {"role": "assistant", "content": [{"type": "text", "text": text}]}], False)
        if not full.startswith(prefix):
            raise ValueError("the chat template renders prompt + answer without the prompt as a prefix")
        ids = self._ids(full[len(prefix) :])
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:  # e.g. llava-hf's template ends a turn with a space, not </s>:
            ids.append(eos)  # without a stop token the policy would never learn where an answer ends
        return ids

    def fingerprint(self) -> str:
        """Hash of the tokenizer (vocabulary, merges, special tokens), the chat template and the image token bound."""
        digest = hashlib.sha256(type(self.tokenizer).__qualname__.encode())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        digest.update((backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab())).encode())
        digest.update(str(self.processor.chat_template or self.tokenizer.chat_template).encode())
        digest.update(f"image tokens <= {self.image_token_budget}".encode())  # decides which pairs max_length drops
        return digest.hexdigest()

    def save_pretrained(self, directory: str) -> Any:
        """Write the processor (tokenizer, chat template, image processor) next to the adapter."""
        return self.processor.save_pretrained(directory)
