"""TRL's `DPOTrainer` and ours side by side on a transformers-native VLM: same model, data, batch sizes, device.

Both run full training steps through their trainers (data loading and image processing included): the time of
a step is the wall time between consecutive step ends, the median over the timed steps. The model is rebuilt from
the same seed for every run, so each trainer starts from identical weights and the peak memory of one run does
not include another's. `tiny` uses the tiny stand-in; `7b` a Qwen2-VL-7B-shaped model with random weights (GPU).
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

from silkie.dev.bench import BenchResult, PeakMemory

OURS = {  # run name -> dpo section switches
    "silkie-plain": {"image_once": False, "share_prompt": False, "precompute_ref_log_probs": False},
    "silkie-optimized": {"image_once": True, "share_prompt": True, "precompute_ref_log_probs": False},
    "silkie-optimized+cached_ref": {"image_once": True, "share_prompt": True, "precompute_ref_log_probs": True},
}
QWEN2_VL_7B = {  # Qwen2-VL-7B-Instruct's shape (config.json of the release)
    "text": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2),
}  # fmt: skip


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer-step ends (CUDA synchronised)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def stand_in_folder(family: str, root: Path) -> Path:
    """The family's tiny stand-in folder (tokenizer, processor, weights) under `root`."""
    from silkie.dev.tiny_hf_vlm import build_tiny_llava, build_tiny_qwen2_vl

    return {"qwen2_vl": build_tiny_qwen2_vl, "llava": build_tiny_llava}[family](root / f"tiny-{family}")


def model_config(folder: Path, size: str):
    """The tiny folder's config, or (size `7b`) Qwen2-VL-7B's shape with the tiny tokenizer's special ids."""
    from transformers import AutoConfig, Qwen2VLConfig

    tiny = AutoConfig.from_pretrained(folder)
    if size == "tiny":
        return tiny
    text = {**QWEN2_VL_7B["text"], "eos_token_id": tiny.text_config.eos_token_id}
    text["pad_token_id"] = tiny.text_config.pad_token_id
    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    ids["vision_end_token_id"] = tiny.vision_end_token_id
    return Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_7B["vision"], **ids)


def random_model(config, device: str, dtype: torch.dtype, attn: str, seed: int = 0):
    """Random weights created directly on `device` in `dtype`."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model


def synthetic_pairs(processor, n: int, question: int, answer: int, image_px: int, seed: int = 0) -> list[dict]:
    """`n` pairs with random `image_px`-square pictures, ~`question`-token questions and ~`answer`-token answers."""
    from silkie.dev.tiny_qwen_vl import demo_corpus

    rng = np.random.default_rng(seed)
    words = " ".join(demo_corpus(60)).split()
    tokenizer = processor.tokenizer

    def text(tokens: int) -> str:
        out: list[str] = []
        while len(tokenizer(" ".join(out), add_special_tokens=False)["input_ids"]) < tokens:
            out.extend(rng.choice(words, size=8).tolist())
        return " ".join(out)

    pairs = []
    for i in range(n):
        pixels = rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        pairs.append({"prompt_id": f"bench-{i}", "image": Image.fromarray(pixels, "RGB"), "prompt": text(question),
                      "chosen": text(answer), "rejected": text(answer)})  # fmt: skip
    return pairs


def _timed_train(trainer, clock: StepClock, device: str, warmup: int) -> tuple[list[float], float]:
    with PeakMemory(device) as memory:
        trainer.train()
    times = [b - a for a, b in zip(clock.ends[warmup:], clock.ends[warmup + 1 :])]
    return times, memory.peak


def run_trl(model, processor, pairs: list[dict], batch_size: int, steps: int, args, out: Path):
    """TRL 1.x `DPOTrainer` (LoRA through `peft_config`, reference = adapters disabled)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    rows = {
        "images": [[p["image"]] for p in pairs],
        "prompt": [[{"role": "user", "content": p["prompt"]}] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    }
    config = DPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=batch_size, max_steps=steps, beta=0.1,
        learning_rate=1e-6, gradient_checkpointing=not args.no_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=args.dtype == "bf16",
        use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_steps=10**6,
        max_length=None, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=args.lora_targets,
                      task_type="CAUSAL_LM")  # fmt: skip
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=processor,
                         peft_config=lora, callbacks=[clock])  # fmt: skip
    return _timed_train(trainer, clock, args.device, args.warmup)


def run_ours(model, codec, images, pairs: list[dict], name: str, batch_size: int, steps: int, args, out: Path):
    """`SilkieDPOTrainer` with the recipe switches of `name` (same LoRA, same data)."""
    from transformers import TrainingArguments

    from silkie.config import DPOSection, LoraSection
    from silkie.data.collator import PairCollator
    from silkie.data.formatting import tokenize_pairs
    from silkie.models.loading import apply_lora
    from silkie.train.arguments import DEFAULTS
    from silkie.train.reference import ReferenceCache
    from silkie.train.trainer import SilkieDPOTrainer

    store = _MemoryStore({p["prompt_id"]: p["image"] for p in pairs})
    records = [{**p, "image": p["prompt_id"], "chosen_score": 1.0, "rejected_score": 0.0} for p in pairs]
    dataset = tokenize_pairs(records, codec).add_column("pair_index", list(range(len(pairs))))
    dpo = DPOSection(beta=0.1, max_length=4096, **OURS[name])
    lora = LoraSection(r=args.lora_r, alpha=16, dropout=0.05, target_modules=None)
    model = apply_lora(model, lora, args.family, disable_dropout=dpo.disable_dropout)  # off, as TRL's default
    if not args.no_gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    training = TrainingArguments(
        output_dir=str(out / name), per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        max_steps=steps, learning_rate=1e-6, bf16=args.dtype == "bf16", use_cpu=args.device == "cpu",
        report_to="none", save_strategy="no", logging_steps=10**6, remove_unused_columns=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
        activation_checkpointing_kwargs=DEFAULTS["activation_checkpointing_kwargs"],
    )  # fmt: skip
    cache = None
    if dpo.precompute_ref_log_probs:
        cache = ReferenceCache(out / name / "reference", args.folder, {"bench": name, "batch": batch_size})
    clock = StepClock()
    trainer = SilkieDPOTrainer(model=model, args=training, train_dataset=dataset,
                               data_collator=PairCollator(store, images, codec.pad_token_id), dpo=dpo,
                               pad_token_id=codec.pad_token_id, reference_cache=cache, callbacks=[clock])  # fmt: skip
    precompute = None
    if cache is not None:  # once per run, before training (timed apart, as `precompute_ref_log_probs` does)
        start = time.perf_counter()
        trainer._reference_table("train")
        precompute = (time.perf_counter() - start) / len(pairs)
    times, peak = _timed_train(trainer, clock, args.device, args.warmup)
    return times, peak, precompute


class _MemoryStore:
    def __init__(self, images: dict[str, Image.Image]):
        self.images = images

    def open(self, key: str) -> Image.Image:
        return self.images[key].copy()


def pair_tokens_of(codec, images, pairs: list[dict]) -> float:
    """Mean distinct tokens per pair (prompt with image tokens once + both answers)."""
    sample = pairs[: min(8, len(pairs))]
    image_tokens = images([p["image"] for p in sample]).tokens_per_image
    total = 0
    for pair, extra in zip(sample, image_tokens):
        total += len(codec.prompt_ids(pair["prompt"], "x")) - 1 + extra
        total += len(codec.answer_ids(pair["chosen"])) + len(codec.answer_ids(pair["rejected"]))
    return total / len(sample)


def run(args) -> list[BenchResult]:
    """Every requested run (TRL first) at every batch size; prints a line per run and returns the results."""
    from silkie.config import LoraSection, ModelSection
    from silkie.models.family import get_family

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    family = get_family(args.family)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = args.folder = stand_in_folder(args.family, root)
        pixels = args.image_px * args.image_px if args.family == "qwen2_vl" else None
        section = ModelSection(path=str(folder), family=args.family, min_pixels=pixels, max_pixels=pixels)
        codec = family.load_codec(section)
        config = model_config(folder, args.size)
        images = family.image_processor(config, section)
        args.lora_targets = family.lora_target_regex(LoraSection())
        for size in args.batch_sizes:
            steps = args.warmup + args.steps + 1
            pairs = synthetic_pairs(
                codec.processor, size * steps, args.question_tokens, args.answer_tokens, args.image_px
            )
            tokens = pair_tokens_of(codec, images, pairs)
            for name in args.runs:
                model = random_model(config, args.device, dtype, args.attn)
                precompute = None
                if name == "trl":
                    times, peak = run_trl(model, codec.processor, pairs, size, steps, args, root)
                else:
                    times, peak, precompute = run_ours(model, codec, images, pairs, name, size, steps, args, root)
                median = statistics.median(times)
                result = BenchResult(
                    path=name, batch_size=size, step_seconds=median, step_seconds_spread=max(times) - min(times),
                    pairs_per_second=size / median, tokens_per_second=tokens * size / median,
                    peak_memory_gib=peak / 2**30, tflop_per_pair=None, mfu=None,
                    reference_precompute_seconds_per_pair=precompute,
                )  # fmt: skip
                results.append(result)
                print(f"{name:28s} batch {size:3d}: {result.pairs_per_second:.3f} pairs/s, "
                      f"peak {result.peak_memory_gib:.2f} GiB", flush=True)  # fmt: skip
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return results
