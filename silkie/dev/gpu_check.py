"""GPU proof script (one run on the lent card): CUDA correctness, Qwen-VL-Chat-size step + generation, benchmark.

Stages: (1) tiny model logits on GPU fp32/bf16 vs CPU fp32, optimized step vs plain step on GPU;
(2) official-size model (random bf16 weights made on the GPU): one LoRA DPO step of each path with
gradient checkpointing, and greedy generation of a few tokens from an image prompt; (3) the
side-by-side benchmark (plain vs optimized) at that size; (4) a profile of one optimized step.
`--tiny --device cpu` runs every stage with the tiny model, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def relative_error(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def stage_correctness(device: str) -> dict:
    """Tiny model: GPU logits vs CPU fp32; optimized vs plain DPO step on the device."""
    import torch

    from silkie.config import LoraSection
    from silkie.dev.probe import image_prompt_ids, random_pair_batch, tiny_config
    from silkie.dpo.step import StepOptions, encode_images_once, score_answers
    from silkie.models.loading import apply_lora
    from silkie.models.qwen_vl import QWenLMHeadModel

    torch.manual_seed(0)
    config = tiny_config()
    cpu_model = QWenLMHeadModel(config).eval()
    ids = image_prompt_ids(config, batch=2, prefix=6, suffix=30)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = cpu_model(ids, pixel_values=pixels).logits
        gpu32 = cpu_model.to(device)(ids.to(device), pixel_values=pixels.to(device)).logits.cpu()
        gpu16 = cpu_model.to(torch.bfloat16)(ids.to(device), pixel_values=pixels.to(device)).logits.float().cpu()
    result = {"logits_fp32_rel_err": relative_error(gpu32, ref), "logits_bf16_rel_err": relative_error(gpu16, ref)}

    torch.manual_seed(1)
    model = apply_lora(QWenLMHeadModel(config).to(device), LoraSection(r=8, alpha=16, dropout=0.0)).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    batch = random_pair_batch(config, [(5, 30, 24), (9, 13, 40), (2, 25, 5)], [True, False, True], seed=3)
    batch = {k: v.to(device) for k, v in batch.items()}

    def run(options):
        features = encode_images_once(model, batch) if options.image_once else None
        policy = score_answers(model, batch, options, 0, features)
        with model.disable_adapter():
            reference = score_answers(model, batch, options, 0, features, no_grad=True)
        loss = -torch.nn.functional.logsigmoid(
            0.1 * ((policy.chosen_logps - reference.chosen_logps) - (policy.rejected_logps - reference.rejected_logps))
        ).mean()
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return policy, reference, loss.detach(), grads

    plain = run(StepOptions(image_once=False, share_prompt=False, chunked_logps=False))
    fast = run(StepOptions(image_once=True, share_prompt=True, chunked_logps=True, chunk_size=16))
    result["step_policy_logps_max_abs_diff"] = float(
        max(
            (fast[0].chosen_logps - plain[0].chosen_logps).abs().max(),
            (fast[0].rejected_logps - plain[0].rejected_logps).abs().max(),
        )
    )
    result["step_reference_logps_max_abs_diff"] = float(
        max(
            (fast[1].chosen_logps - plain[1].chosen_logps).abs().max(),
            (fast[1].rejected_logps - plain[1].rejected_logps).abs().max(),
        )
    )
    result["step_loss_abs_diff"] = float((fast[2] - plain[2]).abs())
    result["step_lora_grad_max_abs_diff"] = float(max((fast[3][n] - plain[3][n]).abs().max() for n in plain[3]))
    if device.startswith("cuda"):  # flex attention has no backward on CPU
        flex_model = copy.deepcopy(model)
        flex_model.get_base_model().config._attn_implementation = "flex_attention"
        flex_policy = score_answers(flex_model, batch, StepOptions(chunk_size=16), 0)
        flex_policy.chosen_logps.sum().backward()
        flex_grads = {n: p.grad for n, p in flex_model.named_parameters() if p.grad is not None}
        model.zero_grad()
        sdpa_policy = score_answers(model, batch, StepOptions(chunk_size=16), 0)
        sdpa_policy.chosen_logps.sum().backward()
        result["flex_vs_sdpa_logps_max_abs_diff"] = float(
            (flex_policy.chosen_logps - sdpa_policy.chosen_logps).abs().max()
        )
        result["flex_vs_sdpa_grad_max_abs_diff"] = float(
            max((flex_grads[n] - p.grad).abs().max() for n, p in model.named_parameters() if p.grad is not None)
        )
    result["ok"] = (
        result["logits_fp32_rel_err"] < 1e-3
        and result["logits_bf16_rel_err"] < 3e-2
        and result["step_policy_logps_max_abs_diff"] < 1e-3
        and result["step_loss_abs_diff"] < 1e-4
    )
    return result


def stage_full_size(device: str, tiny: bool, dtype_name: str) -> tuple[dict, object, object]:
    """Official-size model on the device: one DPO step per path (checkpointing) and greedy generation."""
    import torch

    from silkie.config import DPOSection, LoraSection
    from silkie.dev.probe import PATHS, build_model, official_config, synthetic_batch, tiny_config, train_step

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    config = tiny_config() if tiny else official_config()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(config, device, dtype, LoraSection(), checkpointing=True)
    result = {
        "build_seconds": time.perf_counter() - start,
        "params_billion": sum(p.numel() for p in model.parameters()) / 1e9,
        "trainable_lora_million": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = synthetic_batch(config, 2, 40, 150, seed=0)
    for path, options in PATHS.items():
        loss = train_step(model, optimizer, batch, options, DPOSection(), device)
        result[f"{path}_step_loss"] = loss
    result["step_losses_finite"] = all(abs(result[f"{p}_step_loss"]) < 1e4 for p in PATHS)
    base = model.get_base_model()
    base.eval()
    prompt = batch["prompt_input_ids"][:1, : int(batch["prompt_attention_mask"][0].sum())].to(device)
    with torch.no_grad():
        generated = base.generate(
            prompt,
            pixel_values=batch["pixel_values"][:1].to(device, dtype),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    result["generated_new_tokens"] = int(generated.size(1) - prompt.size(1))
    result["generated_ids"] = generated[0, prompt.size(1) :].tolist()
    base.train()
    if device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result, model, config


def stage_profile(model, config, device: str) -> list[str]:
    """Top kernels of one optimized step (torch.profiler), as text lines."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from silkie.config import DPOSection
    from silkie.dev.probe import PATHS, synthetic_batch, train_step

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = synthetic_batch(config, 8, 40, 150, seed=5)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, batch, PATHS["optimized"], DPOSection(), device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15).splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="use the tiny model for the full-size stages (CPU check)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    args = parser.parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    report["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    say(f"torch {report['torch']}, transformers {report['transformers']}, device {report['device_name']}")
    stages = [("correctness", lambda: stage_correctness(args.device))]
    holder: dict = {}

    def full() -> dict:
        result, holder["model"], holder["config"] = stage_full_size(args.device, args.tiny, args.dtype)
        return result

    def bench() -> dict:
        from silkie.dev.bench_cli import main as bench_main

        bench_args = [
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--steps",
            str(args.steps),
            "--warmup",
            "1",
            "--count-flops",
            "--out",
            str(args.out / "bench.json"),
            "--batch-sizes",
            *map(str, args.batch_sizes),
        ]
        holder.pop("model", None)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        results = bench_main(bench_args + (["--tiny", "--lora-r", "16"] if args.tiny else []))
        return {"results": [r.__dict__ for r in results]}

    def profile_stage() -> dict:
        from silkie.config import LoraSection
        from silkie.dev.probe import build_model, official_config, tiny_config

        config = tiny_config() if args.tiny else official_config()
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = build_model(config, args.device, dtype, LoraSection(), checkpointing=True)
        lines = stage_profile(model, config, args.device)
        print("\n".join(lines), flush=True)
        return {"top_kernels": lines}

    stages += [("full_size", full), ("benchmark", bench), ("profile", profile_stage)]
    for name, run in stages:
        start = time.perf_counter()
        try:
            report[name] = run()
            say(f"{name}: {json.dumps({k: v for k, v in report[name].items() if k not in ('results', 'top_kernels')})}")
        except Exception as err:  # noqa: BLE001 - record and go on to the next stage
            report[name] = {"error": f"{type(err).__name__}: {err}"}
            say(f"{name}: FAILED {type(err).__name__}: {err}")
        report[name]["seconds"] = time.perf_counter() - start
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    return 0
