"""One training process: recipe -> data -> model (+LoRA) -> DPO trainer -> adapter, metrics, plot.

Normally started by `launch_dpo.py` under torchrun; works as a single process too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from silkie.config import Recipe, RecipeError, save_recipe
from silkie.run_dir import (
    ADAPTER_DIR,
    CACHE_DIR,
    CONFIG_NAME,
    FINAL_METRICS_NAME,
    FINISHED_NAME,
    METRICS_NAME,
    REFERENCE_DIR,
    TENSORBOARD_DIR,
    latest_checkpoint,
    remove_staging,
    resumable_checkpoint,
)

from .guards import disk_space_guard
from .metrics import MetricsJsonlCallback
from .preemption import PreemptionCallback

__all__ = ["latest_checkpoint", "remove_staging", "run_training"]
EXIT_PREEMPTED = 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _is_main():
        print(f"[silkie] {text}", flush=True)


def run_training(recipe: Recipe, working: str | Path) -> dict:
    """Train as the recipe says in `working`; resume from its latest checkpoint; return final facts."""
    from transformers import set_seed

    from silkie.data.build import prepare_data
    from silkie.data.collator import PairCollator
    from silkie.data.images import DECODE_VERSION
    from silkie.models.family import get_family
    from silkie.models.loading import (
        build_frozen_reference,
        build_policy,
        load_tokenizer,
        local_checkpoint,
        resolve_dtype,
    )
    from silkie.train.arguments import training_arguments
    from silkie.train.plots import plot_metrics
    from silkie.train.reference import ReferenceCache
    from silkie.train.trainer import SilkieDPOTrainer, check_resume_layout

    preemption = PreemptionCallback()  # from the start: a signal during data or model loading stops after step 1
    working = Path(working)
    working.mkdir(parents=True, exist_ok=True)
    if _is_main():
        for path in remove_staging(working):
            _say(f"removed half-written {path.name} from an interrupted run")
        if not (working / CONFIG_NAME).exists():
            save_recipe(recipe, working / CONFIG_NAME)
    dtype = resolve_dtype(recipe.model.dtype)
    args = training_arguments(recipe, working, bf16=dtype == torch.bfloat16)  # before the model: ZeRO-3 init
    _ = args.device  # starts the process group now, so ZeRO-3 partitions the weights across all ranks at load
    if args.deepspeed and dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed()  # deepspeed.comm over the same group (zero.Init reads its world size)
    with args.main_process_first(desc="model files"):  # a hub id: one download per node, then its local folder
        model_dir = local_checkpoint(recipe.model.path)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=model_dir))
    tokenizer = load_tokenizer(recipe.model)
    if tokenizer.image_token_budget >= recipe.dpo.max_length:
        raise RecipeError(
            f"model.max_pixels: one image may take {tokenizer.image_token_budget} tokens, not below dpo.max_length "
            f"= {recipe.dpo.max_length}, so every pair with an image would be dropped; lower model.max_pixels "
            "(e.g. 200704 = 448x448 -> 256 tokens) or raise dpo.max_length"
        )
    with args.main_process_first(desc="tokenizing pairs"):
        data = prepare_data(recipe.data, tokenizer, recipe.dpo.max_length, recipe.data.cache_dir or working / CACHE_DIR)
    _say(f"data: {data.report.summary()}")
    _say(f"data: {len(data.train)} train pairs, {len(data.eval) if data.eval is not None else 0} eval pairs")
    set_seed(args.seed)  # LoRA initialisation must not depend on what ran before (cache hit or miss)
    model = build_policy(recipe.model, recipe.lora, disable_dropout=recipe.dpo.disable_dropout)
    if recipe.dpo.disable_dropout and recipe.lora.enabled and recipe.lora.dropout > 0:
        _say(f"dropout is off (dpo.disable_dropout, TRL's default): lora.dropout {recipe.lora.dropout} is not applied")
    ref_model = None if recipe.lora.enabled else build_frozen_reference(recipe.model)
    family = get_family(recipe.model.family)
    for member in (model, ref_model):
        if member is not None:
            family.prepare_for_training(member)
    processor = family.image_processor(model.config, recipe.model)
    collator = PairCollator(data.image_store, processor, tokenizer.pad_token_id)
    reference_cache = None
    if recipe.dpo.precompute_ref_log_probs:
        options = {"dtype": str(dtype), "max_length": recipe.dpo.max_length, "lora": recipe.lora.enabled}
        # the pixel bounds decide how many tokens each image takes, so they decide the reference log-probs too
        options |= {"family": recipe.model.family, "attn": recipe.model.attn_implementation}
        options["images"] = processor.fingerprint()
        options["image_decode"] = DECODE_VERSION
        if recipe.dpo.ld_alpha is not None:  # LD-DPO weights the reference's answer tokens too
            options["ld_alpha"] = recipe.dpo.ld_alpha
        reference_cache = ReferenceCache(working / REFERENCE_DIR, recipe.model.path, options)
    trainer = SilkieDPOTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        dpo=recipe.dpo,
        pad_token_id=tokenizer.pad_token_id,
        ref_model=ref_model,
        reference_cache=reference_cache,
        callbacks=[MetricsJsonlCallback(working / METRICS_NAME), preemption],
    )
    if ref_model is not None:
        trainer.ref_model = _place_reference(trainer, ref_model)
    with args.main_process_first(local=False, desc="checking the last checkpoint"):  # one process moves a bad one
        resume = resumable_checkpoint(working, _say) if args.process_index == 0 else latest_checkpoint(working)
    try:
        if resume is not None:
            check_resume_layout(resume, args.world_size)
            _say(f"resuming from {resume.name}")
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        # decided from state every rank shares: a signal after the last step (final evaluation or save) on one
        # rank only must not send that rank into teardown while the others finish
        if preemption.stopped and trainer.state.global_step < trainer.state.max_steps:
            name = signal.Signals(preemption.received).name
            _say(f"stopped on {name}: checkpoint saved at step {trainer.state.global_step}")
            result = {"preempted": True, "step": trainer.state.global_step}
        else:
            result = _finish(trainer, tokenizer, working, data.eval is not None, plot_metrics)
    except BaseException:
        _teardown(trainer, synchronize=False)  # the other ranks may be inside a collective: no barrier
        raise
    _teardown(trainer, synchronize=True)
    return result


def _place_reference(trainer, ref_model):
    """Frozen reference for full fine-tuning: sharded by DeepSpeed under ZeRO-3, else on the device."""
    if trainer.is_deepspeed_enabled and trainer.args.hf_deepspeed_config.is_zero3():
        import deepspeed

        config = dict(trainer.args.hf_deepspeed_config.config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()
        return engine
    return ref_model.to(trainer.args.device)


def _finish(trainer, tokenizer, working: Path, has_eval: bool, plot_metrics) -> dict:
    adapter_dir = working / ADAPTER_DIR
    with disk_space_guard(adapter_dir, working, "the adapter"):
        trainer.save_model(str(adapter_dir))
    metrics: dict = {"step": trainer.state.global_step}
    if has_eval:
        evaluation = _evaluation_at(trainer.state.log_history, trainer.state.global_step) or trainer.evaluate()
        metrics.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and k != "step"})
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(adapter_dir)
        (working / FINAL_METRICS_NAME).write_text(json.dumps(metrics, indent=2))
        plot = plot_metrics(working)
        (working / FINISHED_NAME).write_text(json.dumps({"step": trainer.state.global_step}))
        accuracy = metrics.get("eval_rewards/accuracies")
        print(f"[silkie] adapter: {adapter_dir}", flush=True)
        print(f"[silkie] metrics: {working / METRICS_NAME} (tensorboard: {working / TENSORBOARD_DIR})", flush=True)
        print(f"[silkie] plot: {plot}", flush=True)
        if accuracy is not None:
            print(f"[silkie] held-out reward accuracy: {accuracy:.3f}", flush=True)
    return metrics


def _evaluation_at(log_history: list[dict], step: int) -> dict | None:
    """The held-out evaluation the Trainer already ran at `step` (its last one), so the end does not repeat it."""
    latest = next((record for record in reversed(log_history) if "eval_loss" in record), None)
    return latest if latest is not None and latest.get("step") == step else None


def _teardown(trainer, synchronize: bool) -> None:
    """Release the DeepSpeed engine and the process group (a live gloo thread can abort the exit)."""
    engine = getattr(trainer, "model_wrapped", None)
    if trainer.is_deepspeed_enabled and hasattr(engine, "destroy"):
        engine.destroy()
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
