"""`build_trainer(recipe, working)`: the one place a run is wired (arguments, data, policy, reference, collator,
reference cache, callbacks, trainer). Training, the benchmarks and `evaluate_pairs` all build their trainer here;
what they bring themselves (a random model, synthetic pairs, a trained adapter) is passed in, the wiring is the same.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from silkie.config import Recipe, RecipeError, save_recipe
from silkie.config.names import QWEN_HF_FAMILIES, TILED_FAMILIES
from silkie.config.objective import uses_reference
from silkie.config.trackers import missing_trackers
from silkie.errors import InputError
from silkie.logs import get_logger
from silkie.run_dir import (
    CACHE_DIR,
    CONFIG_NAME,
    EVAL_SAMPLES_NAME,
    METRICS_NAME,
    REFERENCE_DIR,
    TENSORBOARD_DIR,
    remove_staging,
)

from .metrics import MetricsJsonlCallback
from .preemption import PreemptionCallback

logger = get_logger(__name__)


def is_main_process() -> bool:
    """Rank 0 of the run (also before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def say(text: str) -> None:
    """One line of the run's progress (rank 0, `[silkie] ...`)."""
    logger.info(text)


@dataclass
class BuiltRun:
    """A wired run: its trainer and what it was built from (`recipe.model.path` resolved to a local folder)."""

    recipe: Recipe
    working: Path
    trainer: Any
    codec: Any
    data: Any
    preemption: PreemptionCallback | None


def build_trainer(
    recipe: Recipe,
    working: str | Path,
    *,
    bookkeeping: bool = True,
    base_model: nn.Module | None = None,
    policy: nn.Module | None = None,
    codec: Any = None,
    data: Any = None,
    callbacks: tuple = (),
) -> BuiltRun:
    """The trainer of `recipe` in `working`, and its parts.

    `bookkeeping`: `working` is this run's folder (it is tidied, gets `config.yaml` and `metrics.jsonl`, and stop
    signals save a checkpoint); false where the trainer only scores or is timed. What a caller brings replaces
    what the recipe would load: `base_model` (the checkpoint, e.g. random weights; LoRA and the recipe's
    switches are applied as to a loaded one), `policy` (a finished policy, e.g. base + trained adapter), `codec`
    (the text codec) and `data` (a `PreparedData`).
    """

    from silkie.data.build import prepare_data
    from silkie.logs import on_terminal, quiet_libraries
    from silkie.models.loading import load_tokenizer, local_checkpoint, resolve_dtype

    from .arguments import training_arguments, unset_learning_rate_note

    preemption = PreemptionCallback() if bookkeeping else None  # from the start: a signal while loading stops early
    if bookkeeping:
        quiet_libraries(terminal=on_terminal())
    working = Path(working)
    working.mkdir(parents=True, exist_ok=True)
    if bookkeeping and is_main_process():
        for note in [unset_learning_rate_note(recipe), *recipe.dpo.notes()]:
            if note:
                logger.warning(note)
        for path in remove_staging(working):
            say(f"removed half-written {path.name} from an interrupted run")
        if not (working / CONFIG_NAME).exists():
            save_recipe(recipe, working / CONFIG_NAME)
    tracker = missing_trackers(recipe.training)
    if tracker:  # transformers would stop with a traceback once the data is loaded
        raise InputError(tracker)
    dtype = resolve_dtype(recipe.model.dtype)
    args = training_arguments(recipe, working, bf16=dtype == torch.bfloat16)  # before the model: ZeRO-3 init
    _ = args.device  # starts the process group now, so ZeRO-3 partitions the weights across all ranks at load
    if args.deepspeed and dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed()  # deepspeed.comm over the same group (zero.Init reads its world size)
    if base_model is None and policy is None:
        with args.main_process_first(desc="model files"):  # a hub id: one download per node, then its local folder
            model_dir = local_checkpoint(recipe.model.path)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=model_dir))
    if recipe.model.ref_model:
        with args.main_process_first(desc="reference model files"):
            ref_dir = local_checkpoint(recipe.model.ref_model, "model.ref_model")
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, ref_model=ref_dir))
    codec = codec if codec is not None else load_tokenizer(recipe.model)
    if codec.image_token_budget >= recipe.dpo.max_length:
        tiles = recipe.model.family in TILED_FAMILIES
        bound, example = ("model.max_tiles", "6") if tiles else ("model.max_pixels", "200704 = 448x448 -> 256 tokens")
        raise RecipeError(
            f"{bound}: one image may take {codec.image_token_budget} tokens, not below dpo.max_length "
            f"= {recipe.dpo.max_length}, so every pair with an image would be dropped; lower {bound} "
            f"(e.g. {example}) or raise dpo.max_length"
        )
    if data is None:
        with args.main_process_first(desc="tokenizing pairs"):
            cache = recipe.data.cache_dir or working / CACHE_DIR
            data = prepare_data(recipe.data, codec, recipe.dpo.max_length, cache)
        if bookkeeping:  # a tool's stdout is its own table
            say(f"data: {data.report.summary()}")
            say(f"data: {len(data.train)} train pairs, {len(data.eval) if data.eval is not None else 0} eval pairs")
            _explain_video_drops(recipe, codec, data.report)
    if bookkeeping:
        from .console import settings_line

        say(settings_line(args, recipe.dpo.beta, recipe.dpo.loss_type))
    model, ref_model = _policy_and_reference(recipe, base_model, policy, args.seed)
    _check_reentrant_checkpointing(args, model, recipe.model.family)
    trainer = _trainer(recipe, working, args, model, ref_model, codec, data, dtype, bookkeeping, callbacks, preemption)
    if recipe.dpo.sync_ref_model and policy is None:  # a finished policy is scored against its starting model
        _reference_sync(recipe, trainer, bookkeeping)
    if recipe.dpo.generate_during_eval and bookkeeping and data.eval is not None:
        from .eval_samples import EvalSamplesCallback

        dpo = recipe.dpo
        path = working / EVAL_SAMPLES_NAME
        trainer.add_callback(EvalSamplesCallback(trainer, codec, path, dpo.generate_num_prompts,
                                                 dpo.generate_max_new_tokens))  # fmt: skip
    return BuiltRun(recipe, working, trainer, codec, data, preemption)


def _explain_video_drops(recipe: Recipe, codec: Any, report: Any) -> None:
    """Pairs with a video dropped as too_long where one video alone may fill dpo.max_length: say which keys to
    change (only when such drops happened: data without videos hears nothing of it)."""
    budget = codec.video_marker_id is not None and codec.video_token_budget(recipe.data.video_max_frames)
    if budget and budget >= recipe.dpo.max_length and report.too_long_with_video:
        pixels = "model.video_max_pixels or " if recipe.model.family in QWEN_HF_FAMILIES else ""  # InternVL: frames
        logger.warning(
            f"{report.too_long_with_video} pairs with a video were dropped as too_long: a video of "
            f"data.video_max_frames = {recipe.data.video_max_frames} frames may take {budget} tokens, not below "
            f"dpo.max_length = {recipe.dpo.max_length}; lower {pixels}data.video_max_frames, or raise dpo.max_length"
        )


def _check_reentrant_checkpointing(args: Any, model: nn.Module, family: str) -> None:
    """`InputError` where reentrant activation checkpointing would lose gradients the model needs (the family's
    reason, e.g. layers that reuse an earlier layer's keys and values)."""
    from silkie.models.family import get_family, unwrap_causal_lm

    options = args.activation_checkpointing_kwargs or {}
    if not (args.activation_checkpointing and options.get("use_reentrant")):
        return
    problem = get_family(family).reentrant_checkpointing_problem(unwrap_causal_lm(model)[0])
    if problem:
        raise InputError(
            f"training.activation_checkpointing_kwargs.use_reentrant: true with this checkpoint: {problem}; set it to "
            "false (the default)"
        )


def _policy_and_reference(
    recipe: Recipe, base_model: nn.Module | None, policy: nn.Module | None, seed: int
) -> tuple[nn.Module, nn.Module | None]:
    """The policy (LoRA on the base, or the whole model) and a frozen reference: `model.ref_model`, or for full
    fine-tuning a copy of the base (none for the reference-free losses; under LoRA the adapters switched off)."""
    from silkie.models.family import get_family
    from silkie.models.kernels import apply_kernels
    from silkie.models.loading import build_frozen_reference, build_policy, check_reference, make_policy

    if policy is not None:
        model = policy
    elif base_model is not None:
        model = make_policy(base_model, recipe.lora, recipe.model.family, recipe.dpo.disable_dropout, seed)
    else:
        model = build_policy(recipe.model, recipe.lora, recipe.dpo.disable_dropout, seed=seed)
    if recipe.dpo.disable_dropout and recipe.lora.enabled and recipe.lora.dropout > 0 and policy is None:
        say(f"dropout is off (dpo.disable_dropout, TRL's default): lora.dropout {recipe.lora.dropout} is not applied")
    if recipe.dpo.pairs_per_row > 1 and recipe.model.attn_implementation in ("sdpa", "eager"):
        say(
            f"dpo.pairs_per_row {recipe.dpo.pairs_per_row} with {recipe.model.attn_implementation} attention: its "
            "dense mask makes attention grow with the whole packed row; varlen and flex_attention do not"
        )
    ref_model = None
    if recipe.model.ref_model:  # another checkpoint (the recipe refuses it with a reference-free loss)
        ref_model = build_frozen_reference(recipe.model, load_in_4bit=recipe.lora.load_in_4bit)
        check_reference(model, ref_model, recipe.model)
        say(f"reference: {recipe.model.ref_model} (model.ref_model), frozen beside the policy")
    elif not recipe.lora.enabled and uses_reference(recipe.dpo.loss_type):  # cpo / simpo / orpo read none
        if base_model is not None:
            ref_model = copy.deepcopy(base_model).eval().requires_grad_(False)
        else:
            ref_model = build_frozen_reference(recipe.model)
    family = get_family(recipe.model.family)
    for member in (model, ref_model):
        if member is not None:
            family.prepare_for_training(member)
            applied = apply_kernels(member, recipe.model)
            if member is model and applied:
                say(f"model: {', '.join(applied)}")
    return model, ref_model


def _reference_sync(recipe: Recipe, trainer: Any, bookkeeping: bool) -> None:
    """TR-DPO's moving reference (`dpo.sync_ref_model`): the frozen copy where there is one, else (LoRA) a
    snapshot of the policy's trained tensors; moved by a callback every `dpo.ref_model_sync_steps` steps."""
    from .reference_sync import AdapterSnapshotReference, FrozenCopyReference, ReferenceSync, ReferenceSyncCallback

    if trainer.ref_model is not None:  # ZeRO-3's DeepSpeed engine unwrapped: the policy's parameter names
        reference = FrozenCopyReference(trainer.model, trainer.accelerator.unwrap_model(trainer.ref_model))
    else:
        reference = AdapterSnapshotReference(trainer.model)
    dpo = recipe.dpo
    trainer.reference_sync = ReferenceSync(reference, dpo.ref_model_mixup_alpha, dpo.ref_model_sync_steps)
    trainer.add_callback(
        ReferenceSyncCallback(
            trainer.reference_sync, lambda: trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        )
    )
    if bookkeeping:
        kind = "the frozen reference copy" if trainer.ref_model is not None else "a snapshot of the LoRA adapters"
        say(f"TR-DPO: every {dpo.ref_model_sync_steps} steps {kind} moves toward the policy "
            f"(alpha {dpo.ref_model_mixup_alpha})")  # fmt: skip


def video_sampling(data: Any, model_config: Any, family: str) -> Any:
    """Which frames a video gives: the recipe's `data.video_fps`, `video_min_frames`, `video_max_frames`, in
    multiples of the model's temporal patch, spread as the family's video processor spreads them."""
    from silkie.data.video import VideoSampling
    from silkie.models.family import get_family

    vision = getattr(model_config, "vision_config", None)
    multiple = getattr(vision, "temporal_patch_size", 1) or 1
    spread = get_family(family).video_frame_spread
    return VideoSampling(data.video_fps, data.video_min_frames, data.video_max_frames, int(multiple), spread)


def unused_vision_settings(recipe: Recipe, vision_loss: bool) -> list[str]:
    """The vision-objective keys a recipe set away from their defaults where nothing reads them (`dpo.mdpo_*`
    without the mdpo loss; `data.image_corruption` without a vision loss or the image diagnostics)."""
    from silkie.config.checks import changed_from_default
    from silkie.config.objective import loss_types_of

    unused = []
    if "mdpo" not in loss_types_of(recipe.dpo.loss_type):
        names = ("mdpo_conditional_weight", "mdpo_anchor_weight", "mdpo_anchor_delta")
        unused += [("dpo", name) for name in changed_from_default(recipe.dpo, names)]
    if not (vision_loss or recipe.dpo.image_diagnostics):
        unused += [("data", name) for name in changed_from_default(recipe.data, ("image_corruption",))]
    return [f"{section}.{name} = {getattr(getattr(recipe, section), name)}" for section, name in unused]


def _trainer(recipe, working, args, model, ref_model, codec, data, dtype, bookkeeping, callbacks, preemption) -> Any:
    from transformers.integrations import TensorBoardCallback

    from silkie.data.collator import PairCollator
    from silkie.data.corruption import CORRUPTION_VERSION
    from silkie.data.images import DECODE_VERSION
    from silkie.dpo.losses import DPOObjective
    from silkie.models.family import get_family

    from .console import HF_CONSOLE_CALLBACKS, CompileWatchCallback, ConsoleCallback
    from .reference import ReferenceCache
    from .trainer import SilkieDPOTrainer

    processor = get_family(recipe.model.family).image_processor(model.config, recipe.model)
    # the corrupted copies of the images, where the loss (train and eval) or the diagnostics (eval) score them
    corruption = (recipe.data.image_corruption, recipe.data.seed)
    vision_loss = DPOObjective.from_section(recipe.dpo).scores_corrupted_images
    frames = video_sampling(recipe.data, model.config, recipe.model.family)
    eval_corruption = corruption if vision_loss or recipe.dpo.image_diagnostics else None
    unused = unused_vision_settings(recipe, vision_loss)
    if unused:
        logger.warning(f"{', '.join(unused)} set, but unused: the mdpo_* keys act on dpo.loss_type mdpo, "
                       "data.image_corruption on the vision losses and dpo.image_diagnostics")  # fmt: skip
    collator, eval_collator = (
        PairCollator(data.image_store, processor, codec.pad_token_id, view, video_sampling=frames)
        for view in (corruption if vision_loss else None, eval_corruption)
    )
    reference_cache = None
    if recipe.dpo.precompute_ref_log_probs:
        options = {"dtype": str(dtype), "max_length": recipe.dpo.max_length, "lora": recipe.lora.enabled}
        # the pixel bounds decide how many tokens each image takes, so they decide the reference log-probs too
        options |= {"family": recipe.model.family, "attn": recipe.model.attn_implementation}
        options["images"] = processor.fingerprint()
        options["image_decode"] = DECODE_VERSION
        options["videos"] = frames.fingerprint()
        if recipe.dpo.ld_alpha is not None:  # LD-DPO weights the reference's answer tokens too
            options["ld_alpha"] = recipe.dpo.ld_alpha
        if eval_corruption is not None:  # the corrupted view's columns
            options["image_corruption"] = f"{recipe.data.image_corruption}-{CORRUPTION_VERSION}-{recipe.data.seed}"
        reference_cache = ReferenceCache(working / REFERENCE_DIR, recipe.model.ref_model or recipe.model.path, options)
    run_callbacks = [MetricsJsonlCallback(working / METRICS_NAME), preemption, ConsoleCallback()] if bookkeeping else []
    if bookkeeping and recipe.model.compile_blocks:
        run_callbacks.append(CompileWatchCallback())
    trainer = SilkieDPOTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        eval_data_collator=eval_collator,
        dpo=recipe.dpo,
        pad_token_id=codec.pad_token_id,
        ref_model=ref_model,
        reference_cache=reference_cache,
        callbacks=[*run_callbacks, *callbacks],
    )
    for printer in HF_CONSOLE_CALLBACKS:  # the raw log dicts and a second (evaluation) bar: ConsoleCallback's job
        trainer.remove_callback(printer)
    for callback in trainer.callback_handler.callbacks:
        if bookkeeping and isinstance(callback, TensorBoardCallback):  # <working>/tb, not runs/<date>_<host>
            callback.logging_dir = str(working / TENSORBOARD_DIR)
    if ref_model is not None:
        trainer.ref_model = _place_reference(trainer, ref_model)
    return trainer


def _place_reference(trainer: Any, ref_model: nn.Module) -> nn.Module:
    """The frozen reference model (full fine-tuning, `model.ref_model`): sharded by DeepSpeed under ZeRO-3, else on
    the device."""
    if trainer.is_deepspeed_enabled and trainer.args.hf_deepspeed_config.is_zero3():
        import deepspeed

        config = dict(trainer.args.hf_deepspeed_config.config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()
        return engine
    return ref_model.to(trainer.args.device)
