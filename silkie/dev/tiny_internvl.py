"""A tiny random InternVL folder in the "-hf" format of OpenGVLab/InternVL3-*-hf (a stand-in for tests and the demo).

The same construction as the tiny Qwen2-VL (`tiny_hf_vlm`): a BPE tokenizer trained offline, with Qwen2.5-VL's
added tokens and then InternVL's (`<img>`, `</img>`, `<IMG_CONTEXT>`, ...) in the official order and the tokenizer's
named media tokens; a 2-layer, 32-wide InternViT (112 px tiles, 14 px patches: 64 patches, 16 tokens per tile
after the projector's pixel shuffle) and the 2-layer, 64-wide Qwen2 language model; the PIL GotOcr2 image processor at
InternVL's normalisation (at most 4 tiles + a thumbnail per image) and the checkpoints' chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from silkie.dev.tiny_hf_vlm import (
    PATCH_SIZE,
    QWEN2_VL_SPECIAL_TOKENS,
    TINY_VIT,
    finish_image_only_processor,
    qwen2_text_and_ids,
    save_tiny_model,
    train_tiny_tokenizer,
)
from silkie.dev.tiny_qwen3_vl import QWEN3_ADDED_TOKENS
from silkie.models.hf_vlm.processors import ImageOnlyInternVLProcessor, register_image_only_processors

# after Qwen2.5-VL's added tokens (<tool_call> .. <|file_sep|>), as in InternVL3-*-hf's vocabulary (151665..)
INTERNVL_ADDED_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
INTERNVL_MEDIA_TOKENS = {  # the tokenizer's named tokens InternVLProcessor reads
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# InternVL3-*-hf's chat template: no default system turn; an image part is `<IMG_CONTEXT>\n`, a video `<video>\n`
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_TILE = 112  # tile side in pixels: (112 / 14)^2 = 64 patches -> 16 tokens after the 0.5 pixel shuffle
INTERNVL_MAX_TILES = 4
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_internvl_config(tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    """InternVL with a 2-layer, 32-wide InternViT (112 px tiles) and a 2-layer, 64-wide Qwen2; ids from `tokenizer`."""
    text, _ = qwen2_text_and_ids(tokenizer)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}  # 1-D rotary, as Qwen2.5
    vision = InternVLVisionConfig(**TINY_VIT, image_size=INTERNVL_TILE)
    return InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text, tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(INTERNVL_TILE // PATCH_SIZE) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def named_media_tokens_as_released(path: Path) -> None:
    """Write the tokenizer's named media tokens as the releases do (one `extra_special_tokens` mapping), without the
    copies and load-time keys transformers 5 saves after loading a folder."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for name in ("model_specific_special_tokens", "is_local", "local_files_only", *INTERNVL_MEDIA_TOKENS):
        config.pop(name, None)
    config["extra_special_tokens"] = dict(INTERNVL_MEDIA_TOKENS)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_internvl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random InternVL folder: model, tokenizer (with its media tokens), PIL tiling image processor,
    processor and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = (*QWEN2_VL_SPECIAL_TOKENS, *QWEN3_ADDED_TOKENS[:8], *INTERNVL_ADDED_TOKENS)
    train_tiny_tokenizer(style="qwen2", special_tokens=specials).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out, extra_special_tokens=INTERNVL_MEDIA_TOKENS)  # adds <video>
    config = tiny_internvl_config(tokenizer)
    eos = [config.text_config.eos_token_id, config.text_config.bos_token_id]  # <|im_end|>, <|endoftext|>
    save_tiny_model(InternVLForConditionalGeneration, config, out, seed, eos)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
        crop_to_patches=False,  # as the checkpoints save it; InternVLProcessor's call turns tiling on
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor = ImageOnlyInternVLProcessor(
        image_processor, tokenizer, image_seq_length=config.image_seq_length, chat_template=INTERNVL_CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    named_media_tokens_as_released(out / "tokenizer_config.json")
    video_keys = ("image_mean", "image_std")
    finish_image_only_processor(out, image_processor, video_type="InternVLVideoProcessor", keys=video_keys)
    register_image_only_processors()
    return out
