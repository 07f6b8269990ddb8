"""Tiny Qwen2-VL / Qwen3-VL / Qwen3.5 (dense, MoE) / LLaVA / InternVL / Gemma 3 / Gemma 4 stand-ins and pair batches
for the transformers-native family tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from silkie.config import LoraSection, ModelSection
from silkie.config.names import QWEN_HF_FAMILIES, RECURRENT_FAMILIES, VIDEO_FAMILIES
from silkie.data.collator import PairCollator
from silkie.data.video import VideoSampling
from silkie.dev.clips import noise_clip
from silkie.dev.tiny_builders import tiny_builder
from silkie.dpo.losses import DPOObjective
from silkie.dpo.objective import with_router_balance
from silkie.dpo.step import StepOptions, encode_images_once, score_answers
from silkie.models.family import get_family, unwrap_causal_lm
from silkie.models.loading import apply_lora, load_base_model, load_tokenizer

HF_FAMILIES = (
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "internvl", "gemma3", "gemma4", "qwen3_5",
    "qwen3_5_moe",
)  # fmt: skip
BUILDERS = {family: tiny_builder(family) for family in HF_FAMILIES}
# (prompt, chosen, rejected, image size (w, h) or None): sizes differ so Qwen2-VL grids (and M-RoPE) differ;
# answers stay short so summed fp32 log-probs stay under 64 in magnitude, where 1e-5 is above fp32 rounding (Qwen3.5's
# answers open with the template's closing `</think>`, Gemma 4's reference scores some past 64: `sum_rtol` covers a few
# fp32 steps there)
PAIRS = [
    ("Describe the image.", "There are two red circles.", "A blue square.", (64, 80)),
    ("What colour is the shape?", "It is green.", "A yellow triangle.", (112, 56)),
    ("How many shapes are there?", "Three.", "There is one.", None),
    ("Where is the circle?", "Top left.", "Bottom.", (90, 90)),
]


def pair_image(index: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic random RGB picture."""
    pixels = np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


class MemoryImages:
    """An image store over in-memory pictures keyed `img{i}`."""

    def __init__(self):
        self.images = {f"img{i}": pair_image(i, size) for i, (*_, size) in enumerate(PAIRS) if size}

    def open(self, key: str) -> Image.Image:
        return self.images[key].copy()


def video_side(family: str) -> int:
    """The frame side of 2x2 merged tokens: 56 px (14 px patches), Qwen3-VL's and Qwen3.5's 64 px (16 px patches)."""
    return 64 if family.startswith(("qwen3_vl", "qwen3_5")) else 56


def model_section(folder: Path, family: str, attn: str = "sdpa") -> ModelSection:
    side = video_side(family)  # 2x2 merged tokens per frame
    bounds = {"video_min_pixels": side * side, "video_max_pixels": side * side}
    video = bounds if family in QWEN_HF_FAMILIES else {}  # InternVL's frames are one tile each
    return ModelSection(path=str(folder), family=family, dtype="fp32", attn_implementation=attn, **video)


# (prompt, chosen, rejected, image sizes (w, h), video frame counts): several images of different sizes placed by
# markers or first, a video alone, a video after an image, a long video (16 frames: Qwen2.5-VL's temporal positions
# then run past the text that follows), and a text-only pair
MEDIA_PAIRS = [
    ("Compare <image> with <image>.", "The first is taller.", "They match.", [(64, 80), (112, 56)], []),
    ("Which is brightest?", "The second.", "The third one.", [(56, 56), (90, 90), (64, 64)], []),
    ("What happens in the clip?", "A square moves.", "Nothing.", [], [8]),
    ("Is <image> in the clip <video>?", "Yes, at the end.", "No.", [(70, 70)], [4]),
    ("Go?", "Yes.", "No.", [], [16]),
    ("How many shapes are there?", "Three.", "There is one.", [], []),
]
MEDIA_SAMPLING = VideoSampling(fps=4, min_frames=2, max_frames=16, frame_multiple=2)  # the clips are 4 fps: all frames


class MediaStore:
    """Images `m{pair}-{k}` and videos `v{pair}-{k}` (lossless random clips at 4 fps) in memory."""

    def __init__(self, pairs=MEDIA_PAIRS):
        self.images, self.videos = {}, {}
        for i, (*_, sizes, clips) in enumerate(pairs):
            for k, size in enumerate(sizes):
                self.images[f"m{i}-{k}"] = pair_image(10 * i + k, size)
            for k, frames in enumerate(clips):
                self.videos[f"v{i}-{k}"] = noise_clip(frames, (56, 56), fps=4, seed=10 * i + k)

    def open(self, key: str) -> Image.Image:
        return self.images[key].copy()

    def read_bytes(self, key: str) -> bytes:
        return self.videos[key]


def media_pairs(family: str) -> list:
    """MEDIA_PAIRS a family takes (LLaVA: no video)."""
    return [pair for pair in MEDIA_PAIRS if family in VIDEO_FAMILIES or not pair[4]]


def media_rows(codec, pairs) -> list[dict]:
    """Collator rows of media pairs (keys as `MediaStore` names them, by position in MEDIA_PAIRS)."""
    rows = []
    for prompt, chosen, rejected, sizes, clips in pairs:
        i = MEDIA_PAIRS.index((prompt, chosen, rejected, sizes, clips))
        images, videos = [f"m{i}-{k}" for k in range(len(sizes))], [f"v{i}-{k}" for k in range(len(clips))]
        rows.append(
            {
                "prompt_id": f"p{i}",
                "images": images,
                "videos": videos,
                "prompt_input_ids": codec.prompt_ids(prompt, images, videos),
                "chosen_input_ids": codec.answer_ids(chosen),
                "rejected_input_ids": codec.answer_ids(rejected),
            }
        )
    return rows


def media_batch(folder: Path, family: str, model, corruption=None) -> tuple[dict, int]:
    """The collated batch of the family's `MEDIA_PAIRS` and the pad id."""
    section = model_section(folder, family)
    codec = load_tokenizer(section)
    images = get_family(family).image_processor(model.config, section)
    collator = PairCollator(MediaStore(), images, codec.pad_token_id, corruption, video_sampling=MEDIA_SAMPLING)
    return collator(media_rows(codec, media_pairs(family))), codec.pad_token_id


def tokenized_rows(codec, pairs=PAIRS) -> list[dict]:
    """Collator input rows for `pairs` through the family codec."""
    rows = []
    for i, (prompt, chosen, rejected, size) in enumerate(pairs):
        image = f"img{i}" if size else None
        rows.append(
            {
                "prompt_id": f"p{i}",
                "images": [image] if image else [],
                "prompt_input_ids": codec.prompt_ids(prompt, [image] if image else []),
                "chosen_input_ids": codec.answer_ids(chosen),
                "rejected_input_ids": codec.answer_ids(rejected),
            }
        )
    return rows


def family_batch(folder: Path, family: str, model) -> tuple[dict, int]:
    """The collated batch of `PAIRS` and the pad id."""
    section = model_section(folder, family)
    codec = load_tokenizer(section)
    images = get_family(family).image_processor(model.config, section)
    collator = PairCollator(MemoryImages(), images, codec.pad_token_id)
    return collator(tokenized_rows(codec)), codec.pad_token_id


def lora_model(folder: Path, family: str, std: float = 0.3, seed: int = 0, attn: str = "sdpa"):
    """The tiny checkpoint with LoRA on every LLM linear, B initialised non-zero so the adapter matters."""
    torch.manual_seed(seed)
    base = load_base_model(model_section(folder, family, attn))
    model = apply_lora(base, LoraSection(r=8, alpha=16, dropout=0.0), family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    return model.train()


def sum_rtol(family: str) -> float:
    """The relative tolerance of summed log-probs between two paths: none, but where answers' sums pass 64 (Qwen3.5's
    `</think>` opening; Gemma 4's `<turn|>\n` close, at ~7 nats a token), where three fp32 steps (7.6e-6 each)
    exceed the 1e-5 absolute one."""
    return 3 * 2**-23 if family in (*RECURRENT_FAMILIES, "gemma4") else 0.0


PLAIN = StepOptions(image_once=False, share_prompt=False, chunked_logps=False)
OPTION_SETS = {
    "image_once": StepOptions(image_once=True, share_prompt=False, chunked_logps=False),
    "share_prompt": StepOptions(image_once=False, share_prompt=True, chunked_logps=False),
    "chunked": StepOptions(image_once=False, share_prompt=False, chunked_logps=True, chunk_size=5),
    "all": StepOptions(image_once=True, share_prompt=True, chunked_logps=True, chunk_size=4),
    "three_pairs_per_row": StepOptions(chunk_size=4, pairs_per_row=3),  # rows of 3 and 1: uneven, padded tail
}


def run_step(model, batch, options: StepOptions, pad: int):
    """Policy and reference scores, the DPO loss and the LoRA gradients of one step on `batch`; a MoE model's loss
    adds its routers' load-balancing loss at weight 1 (its gradients then weigh as much as the DPO term's)."""
    base, family = unwrap_causal_lm(model)
    if family.routers(base):
        options = dataclasses.replace(options, router_aux_loss_coef=1.0)
    features = encode_images_once(model, batch) if options.image_once else None
    policy = score_answers(model, batch, options, pad, image_features=features)
    with model.disable_adapter():
        ref = score_answers(model, batch, options, pad, image_features=features, no_grad=True)
    out = DPOObjective(beta=0.1)(policy.chosen_logps, policy.rejected_logps, ref.chosen_logps, ref.rejected_logps)
    if policy.aux_loss is not None:
        out = with_router_balance(out, policy.aux_loss, options.router_aux_loss_coef)
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return policy, ref, out.loss.detach(), grads


def grad_atol(family: str) -> float:
    """The absolute tolerance of LoRA gradients between two paths: 1e-5; Qwen3.5's 5e-5, as its gated-delta kernel
    computes in fp32 whatever the input, chunk by chunk from a sequence's start, and a shared prompt's answers start
    their chunks after it (test_qwen3_5: the paths agree to fp64 rounding with an fp64 rule)."""
    return 5e-5 if family in RECURRENT_FAMILIES else 1e-5


def assert_same_step(fast, plain, family: str = "") -> None:
    """Two `run_step` results agree: log-probs of policy and reference, the loss and every LoRA gradient; and the
    adapter moved the policy away from the reference, so the agreement is not trivial."""
    for kind in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(fast[0], kind), getattr(plain[0], kind), atol=1e-5, rtol=sum_rtol(family))
        torch.testing.assert_close(getattr(fast[1], kind), getattr(plain[1], kind), atol=1e-5, rtol=sum_rtol(family))
    torch.testing.assert_close(fast[2], plain[2], atol=1e-5, rtol=0)
    assert (fast[0].aux_loss is None) == (plain[0].aux_loss is None)
    if plain[0].aux_loss is not None:  # MoE: the routers' loss over the same tokens (a shared prompt's count twice)
        torch.testing.assert_close(fast[0].aux_loss, plain[0].aux_loss, atol=1e-6, rtol=0)
    assert plain[3] and set(fast[3]) == set(plain[3])
    for param in plain[3]:
        torch.testing.assert_close(fast[3][param], plain[3][param], atol=grad_atol(family), rtol=1e-4)
    assert (plain[0].chosen_logps - plain[1].chosen_logps).abs().max() > 1e-2


def join_space_and(folder: Path, char: str) -> None:
    """Teach the tiny BPE to merge a space and `char` into one token (`Ġ<`, `ĠF`), as Qwen's real vocabulary does."""
    import json

    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab |= {token["content"]: token["id"] for token in data["added_tokens"]}  # else their ids would move up
    vocab["\u0120" + char] = len(vocab)
    data["model"]["merges"].insert(0, ["\u0120", char])
    path.write_text(json.dumps(data))
