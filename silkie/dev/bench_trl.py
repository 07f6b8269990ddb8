"""TRL's `DPOTrainer` and ours side by side on a transformers-native VLM: same model, data, batch sizes, device.

Both run full training steps through their trainers (ours built by `build_trainer`; see `silkie.dev.bench`).
`tiny` uses the tiny stand-in; `7b` / `8b` a Qwen2-VL-7B- / Qwen3-VL-8B-shaped model with random weights (GPU).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from silkie.config.names import QWEN_HF_FAMILIES
from silkie.dev.bench import (
    BenchResult,
    StepClock,
    bench_recipe,
    pair_tokens,
    peak_tflops,
    record_failure,
    release,
    result_of,
    run_ours,
    save_report,
    synthetic_pairs,
    timed_train,
)
from silkie.dev.bench_levers import lever_runs, trl_keys
from silkie.models.varlen import constructible

QWEN2_VL_7B = {  # Qwen2-VL-7B-Instruct's shape (config.json of the release)
    "text": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2),
}  # fmt: skip
QWEN3_VL_8B = {  # Qwen3-VL-8B-Instruct's shape (config.json of the release)
    "text": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    ),
    "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                   deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
}  # fmt: skip
QWEN3_VL_30B_A3B = {  # Qwen3-VL-30B-A3B-Instruct's shape: 48 sparse layers of 128 experts, 8 per token
    "text": dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, max_position_embeddings=262144,
        rms_norm_eps=1e-6, rope_parameters={**QWEN3_VL_8B["text"]["rope_parameters"]},
    ),
    "vision": {**QWEN3_VL_8B["vision"], "out_hidden_size": 2048},
}  # fmt: skip
INTERNVL3_8B = {  # InternVL3-8B-hf's shape: InternViT-300M (448 px tiles, 256 tokens each) + Qwen2.5-7B
    "text": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
    ),
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                   layer_scale_init_value=0.1),
    "processor": {"image_processor": {"size": {"height": 448, "width": 448}}, "image_seq_length": 256},
}  # fmt: skip
GEMMA3_4B = {  # gemma-3-4b-it's shape: SigLIP-400M at 896 px (pooled to 256 tokens) + Gemma 3 4B (5 sliding : 1 full)
    "text": dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, query_pre_attn_scalar=256, vocab_size=262208, sliding_window=1024, max_position_embeddings=131072,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=896, patch_size=14, vision_use_head=False),
    "mm_tokens_per_image": 256,
    "processor": {"image_processor": {"size": {"height": 896, "width": 896}}, "image_seq_length": 256},
}  # fmt: skip
LARGE_SHAPES = {  # family -> (size, shape)
    "qwen2_vl": ("7b", QWEN2_VL_7B),
    "qwen3_vl": ("8b", QWEN3_VL_8B),
    "qwen3_vl_moe": ("30b-a3b", QWEN3_VL_30B_A3B),
    "internvl": ("8b-internvl3", INTERNVL3_8B),
    "gemma3": ("4b-gemma3", GEMMA3_4B),
}


def stand_in_folder(family: str, root: Path, size: str = "tiny") -> Path:
    """The family's tiny stand-in folder (tokenizer, processor, weights) under `root`; for a released shape its
    processor settings (`LARGE_SHAPES`' "processor": InternVL's 448 px tiles of 256 tokens)."""
    from silkie.dev.tiny_builders import tiny_builder

    folder = tiny_builder(family)(root / f"tiny-{family}")
    settings = LARGE_SHAPES[family][1].get("processor", {}) if size != "tiny" else {}
    if settings:
        path = folder / "processor_config.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        for key, value in settings.items():
            saved[key] = {**saved[key], **value} if isinstance(value, dict) else value
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def model_config(folder: Path, size: str):
    """The tiny folder's config, or (size `7b` / `8b`) the family's released shape (`LARGE_SHAPES`) with the tiny
    tokenizer's special ids."""
    from transformers import AutoConfig

    tiny = AutoConfig.from_pretrained(folder)
    if size == "tiny":
        return tiny
    (shape,) = [shape for name, shape in LARGE_SHAPES.values() if name == size]
    text = {**shape["text"], "eos_token_id": tiny.text_config.eos_token_id}
    text["pad_token_id"] = tiny.text_config.pad_token_id
    if tiny.model_type == "internvl":  # one image token; the tower's tiles give image_seq_length tokens each
        return type(tiny)(text_config=text, vision_config=shape["vision"], image_token_id=tiny.image_token_id,
                          tie_word_embeddings=False)  # fmt: skip
    if tiny.model_type == "gemma3":  # the image tokens around the soft tokens; 256 per image
        ids = {k: getattr(tiny, k) for k in ("image_token_id", "boi_token_id", "eoi_token_id")}
        return type(tiny)(text_config=text, vision_config=shape["vision"], mm_tokens_per_image=256, **ids)
    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    ids["vision_end_token_id"] = tiny.vision_end_token_id
    return type(tiny)(text_config=text, vision_config=shape["vision"], **ids)


def random_model(config, device: str, dtype: torch.dtype, attn: str, seed: int = 0):
    """Random weights created directly on `device` in `dtype`, attention `attn` (`varlen`: in the language model)."""
    from transformers import AutoModelForImageTextToText

    from silkie.models.hf_vlm.varlen_attention import use_varlen

    torch.manual_seed(seed)
    config._attn_implementation = constructible(attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    if attn == "varlen":
        use_varlen(model)
    return model


def run_trl(model, processor, pairs: list[dict], batch_size: int, steps: int, args, out: Path, keys: dict):
    """TRL 1.x `DPOTrainer` (LoRA through `peft_config`, reference = adapters disabled), plus the DPOConfig
    fields `keys` (its own speed switches, `bench_levers.TRL_LEVERS`)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    rows = {
        "images": [[p["image"]] for p in pairs],
        "prompt": [[{"role": "user", "content": p["prompt"]}] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    }
    settings = dict(
        output_dir=str(out / "trl"), per_device_train_batch_size=batch_size, max_steps=steps, beta=0.1,
        learning_rate=1e-6, gradient_checkpointing=not args.no_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=args.dtype == "bf16",
        use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_steps=10**6,
        max_length=None, dataloader_num_workers=args.dataloader_workers, seed=0, disable_tqdm=True,
    )  # fmt: skip
    config = DPOConfig(**{**settings, **keys})
    lora = LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=args.lora_targets,
                      task_type="CAUSAL_LM")  # fmt: skip
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=processor,
                         peft_config=lora, callbacks=[clock])  # fmt: skip
    return timed_train(trainer, clock, args.device, args.warmup)


def run(args) -> list[BenchResult]:
    """Every requested run (TRL first) at every batch size; prints a line per run and returns the results."""
    from silkie.config import LoraSection, ModelSection
    from silkie.models.family import get_family

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    family = get_family(args.family)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = args.folder = stand_in_folder(args.family, root, args.size)
        pixels = args.image_px * args.image_px if args.family in QWEN_HF_FAMILIES else None
        section = ModelSection(path=str(folder), family=args.family, min_pixels=pixels, max_pixels=pixels)
        codec = family.load_codec(section)
        config = model_config(folder, args.size)
        images = family.image_processor(config, section)
        args.lora_targets = family.lora_target_regex(LoraSection())
        for size in args.batch_sizes:
            steps = args.warmup + args.steps + 1
            pairs = synthetic_pairs(
                lambda text: len(codec.tokenizer(text, add_special_tokens=False)["input_ids"]),
                size * steps, args.question_tokens, args.answer_tokens, args.image_px,
            )  # fmt: skip
            tokens = pair_tokens(codec, images, pairs)
            for name, run_name, levers in lever_runs(args.runs, getattr(args, "levers", None) or [], size):
                model = None
                try:
                    if run_name.startswith("trl"):
                        # TRL hands no layout down: its model gets the attention varlen is built with
                        model = random_model(config, args.device, dtype, constructible(args.attn))
                        run = run_trl(model, codec.processor, pairs, size, steps, args, root, trl_keys(name))
                    else:
                        recipe = bench_recipe(run_name, args.family, folder, size, steps, args, levers)
                        model = random_model(config, args.device, dtype, recipe.model.attn_implementation)
                        out = root / f"{len(results)}-{size}"
                        run = run_ours(model, recipe, codec, pairs, out, args)
                except Exception as err:  # one failed lever must not cost the card's other runs
                    record_failure(args, name, size, err)
                    save_report(args, results)
                    release(model)
                    continue
                result = result_of(name, size, run, tokens, peak_tflops(args.device, args.peak_tflops))
                results.append(result)
                save_report(args, results)
                print(f"{name:28s} batch {size:3d}: {result.pairs_per_second:.3f} pairs/s, "
                      f"peak {result.peak_memory_gib:.2f} GiB", flush=True)  # fmt: skip
                release(model)
    return results


def best_against_trl(results: list[BenchResult]) -> str:
    """TRL's fastest run (any of its switches and batch sizes) against our fastest that fits in its peak memory,
    with the cached reference and without it: the comparison issue 21's targets are stated in."""
    trl = [r for r in results if r.path.startswith("trl")]
    ours = [r for r in results if not r.path.startswith("trl")]
    if not trl or not ours:
        return ""
    best = max(trl, key=lambda r: r.pairs_per_second)
    lines = [
        f"TRL's best: {best.path} (batch {best.batch_size}): {best.pairs_per_second:.2f} pairs/s, "
        f"peak {best.peak_memory_gib:.2f} GiB"
    ]
    for label, cached in (("with the cached reference", True), ("without the cache", False)):
        side = [r for r in ours if ("cached_ref" in r.path) == cached]
        fitting = [r for r in side if r.peak_memory_gib <= best.peak_memory_gib]
        if not side:
            continue
        pick = max(fitting or side, key=lambda r: r.pairs_per_second)
        where = "within its memory" if fitting else "none within its memory; the fastest"
        memory = pick.peak_memory_gib / best.peak_memory_gib if best.peak_memory_gib > 0 else float("nan")
        lines.append(
            f"ours {label} ({where}): {pick.path} (batch {pick.batch_size}): {pick.pairs_per_second:.2f} pairs/s "
            f"= {pick.pairs_per_second / best.pairs_per_second:.2f}x TRL's best at {memory:.2f}x its peak memory"
        )
    return "\n".join(lines)
