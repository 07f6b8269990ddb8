"""Single-turn Qwen-VL-Chat answers about an image, streamed token by token (base, adapter, or both)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from silkie.models.qwen_vl.tokenization import DEFAULT_SYSTEM, MAX_IMAGE_PATH_BYTES
from silkie.tools.cli import ToolError, read_image

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


def image_reference(path: str | Path) -> str:
    """The text inside `<img>...</img>`: the path as given, or its file name when over the 254-byte limit."""
    text = str(path)
    if len(text.encode("utf-8")) <= MAX_IMAGE_PATH_BYTES:
        return text
    name = Path(text).name
    return name if len(name.encode("utf-8")) <= MAX_IMAGE_PATH_BYTES else "image"


def build_prompt_ids(tokenizer: Any, image_path: str | Path, question: str, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Qwen-VL-Chat prompt ids: `Picture 1: <img>PATH</img>\\n{question}` in the ChatML context."""
    query = tokenizer.from_list_format([{"image": image_reference(image_path)}, {"text": question}])
    return tokenizer.build_chat_context(query, system=system)


def stop_token_ids(tokenizer: Any) -> list[int]:
    if not hasattr(tokenizer, "im_end_id"):  # a transformers tokenizer (Qwen2-VL, LLaVA): its EOS ends the turn
        return [tokenizer.eos_token_id]
    """Generation stops at `<|im_end|>`, `<|im_start|>` or `<|endoftext|>`."""
    return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]


def generate_kwargs(
    tokenizer: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | dict, options: GenerationOptions
) -> dict:
    """Keyword arguments of `model.generate` for one prompt (greedy, or nucleus sampling).

    `pixel_values` is the image tensor, or a dict of the family's image inputs (e.g. + `image_grid_thw`).
    """
    images = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
    pad = getattr(tokenizer, "eod_id", None)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **images,
        max_new_tokens=options.max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=pad if pad is not None else (tokenizer.pad_token_id or tokenizer.eos_token_id),
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
                model.generate(**generate_kwargs(tokenizer, input_ids, pixel_values, options), streamer=streamer)
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
    return "".join(pieces)


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


def chat_once(
    model_dir: str | Path,
    image: str | Path,
    question: str,
    adapter_dir: str | Path | None = None,
    options: GenerationOptions | None = None,
    compare: bool = False,
    system: str = DEFAULT_SYSTEM,
    dtype: str = "auto",
    device: str = "auto",
    write: Callable[[str], Any] | None = None,
) -> dict[str, str]:
    """Load the model (+adapter), build the prompt, stream the answer(s) to `write`; returns them by name.

    The family comes from the model folder's config.json; `system` applies to Qwen-VL-Chat (the
    transformers-native families use their chat template's default system turn).
    """
    from silkie.tools.common import family_of, load_model, resolve_device, resolve_tool_dtype

    if compare and adapter_dir is None:
        raise ToolError("--compare needs --adapter (the base answer is the model with the adapter disabled)")
    picture = read_image(image)
    options = options or GenerationOptions()
    torch_dtype = resolve_tool_dtype(dtype)
    target = resolve_device(device)
    model = load_model(model_dir, adapter_dir, dtype=torch_dtype).to(target)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    prepare = _qwen_vl_inputs if family_of(model_dir) == "qwen_vl" else _family_inputs
    tokenizer, input_ids, images = prepare(model_dir, adapter_dir, config, picture, image, question, system)
    images = {k: v.to(target, torch_dtype) if v.is_floating_point() else v.to(target) for k, v in images.items()}
    return answer_with_labels(model, tokenizer, input_ids.to(target), images, options, compare, write)


def _qwen_vl_inputs(model_dir, adapter_dir, config, picture, image, question, system) -> tuple:
    from silkie.models.qwen_vl import QWenVLImageProcessor
    from silkie.tools.common import load_tokenizer_from

    tokenizer = load_tokenizer_from(model_dir, adapter_dir)
    pixel_values = QWenVLImageProcessor(config.visual["image_size"])([picture])
    return (
        tokenizer,
        torch.tensor([build_prompt_ids(tokenizer, image, question, system)]),
        {"pixel_values": pixel_values},
    )


def _family_inputs(model_dir, adapter_dir, config, picture, image, question, system) -> tuple:
    """Qwen2-VL / LLaVA: the codec's prompt, the image marker expanded to the picture's token count."""
    from silkie.config import ModelSection
    from silkie.data.collator import expand_marker
    from silkie.models.family import get_family
    from silkie.tools.common import family_of, load_codec_from

    family = family_of(model_dir)
    codec = load_codec_from(model_dir, adapter_dir)
    processed = get_family(family).image_processor(config, ModelSection(path=str(model_dir), family=family))([picture])
    ids = expand_marker(codec.prompt_ids(question, str(image)), processed.marker_id, processed.tokens_per_image[0])
    images = dict(processed.tensors)
    if family.startswith("qwen2"):  # M-RoPE needs the modality of each token
        images["mm_token_type_ids"] = torch.tensor([[int(t == processed.marker_id) for t in ids]])
    return codec.tokenizer, torch.tensor([ids]), images
