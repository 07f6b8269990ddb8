"""DPO on the Hugging Face Trainer: loss, TRL metric names, reference handling (checkpoints: `checkpointing`)."""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from silkie.config import DPOSection
from silkie.dpo.losses import DPOObjective
from silkie.dpo.objective import (
    CORRUPT_VIEW,
    BatchScores,
    batch_metrics,
    corrupted_view,
    score_batch,
)
from silkie.dpo.step import (
    encode_images_once,
    recipe_step_options,
    router_aux_loss_coef,
    score_answers,
    vision_differs_from_reference,
)
from silkie.logs import get_logger

from .checkpointing import CheckpointingMixin, ResumeError, check_resume_layout
from .guards import (
    NonFiniteLossError,
    check_grad_norm,
    untouched,
)
from .preemption import PreemptionCallback, any_rank
from .reference import ReferenceCache, ReferencePass
from .reference_sync import ReferenceSync

__all__ = ["NonFiniteLossError", "ResumeError", "SilkieDPOTrainer", "check_resume_layout"]
logger = get_logger(__name__)


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped order drawn from `seed + epoch`, so a resumed run sees exactly the same batches."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of every epoch."""
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class EvaluationCutShort(Exception):
    """A stop signal arrived during a mid-run evaluation (raised on every rank at the same batch)."""


class SilkieDPOTrainer(CheckpointingMixin, Trainer):
    """`transformers.Trainer` whose loss is DPO over collated preference pairs.

    The reference is the same model with LoRA adapters disabled, a separate frozen `ref_model` (full
    fine-tuning, or `model.ref_model`), or reference log-probs precomputed into the batch (`ref_chosen_logps`,
    `ref_rejected_logps`). Under TR-DPO (`reference_sync`) the frozen copy moves, or under LoRA the policy scores
    with a snapshot of its trained tensors swapped in.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        dpo: DPOSection,
        pad_token_id: int,
        ref_model: nn.Module | None = None,
        reference_cache: ReferenceCache | None = None,
        eval_data_collator: Any = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator or self.data_collator
        self.dpo = dpo
        self.objective = DPOObjective.from_section(dpo)
        self.pad_token_id = pad_token_id
        self.ref_model = ref_model
        self.reference_sync: ReferenceSync | None = None  # TR-DPO's moving reference (`build._reference_sync`)
        self._reference_released = False
        self.reference_cache = reference_cache
        self._ref_tables: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._pairs_left_out = 0  # this launch's training pairs whose media failed to load (weight 0), all ranks
        self._evaluation_cut_short = False  # recorded in the checkpoint saved then: the resume runs it again
        self._evaluation_pending: Path | None = None  # the checkpoint whose evaluation the resume runs again
        # the pairs again under corrupted images: for a vision-aware loss, and (diagnostics) at evaluation
        self.corrupted_views = {"train": self.objective.scores_corrupted_images}
        self.corrupted_views["eval"] = self.corrupted_views["train"] or dpo.image_diagnostics
        # features encoded once serve policy and reference only where both see the same tower: the reference is
        # the policy with its adapters off, and the tower carries no trained weights or adapters
        trainable_vision = ref_model is not None or vision_differs_from_reference(self.model)
        balance = router_aux_loss_coef(self.model, dpo.router_aux_loss_coef)
        self.step_options = recipe_step_options(dpo, dpo.image_once and not trainable_vision, balance)
        if dpo.image_once and trainable_vision:
            self.log_line(
                "image_once: the policy's image features are not the reference's (a trained vision tower or "
                "projector, or a separate reference model), so images are encoded in every forward (exact path)"
            )

    def log_line(self, text: str) -> None:
        """One line of the run's progress (rank 0)."""
        logger.info(text)

    # ----- the DPO step -------------------------------------------------------------------------------------------
    def reference_scores(
        self, model: nn.Module, batch: dict, features: torch.Tensor | None, use_table: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Reference log-probs (chosen, rejected): precomputed table, frozen copy, or the policy with adapters off
        (the table's columns 2-3 for the corrupted-image view)."""
        table = self._reference_table("train" if model.training else "eval") if use_table else None
        columns = slice(2, 4) if batch.get("view") == CORRUPT_VIEW else slice(0, 2)
        if table is not None and table.size(1) >= columns.stop:
            picked = table[batch["pair_index"].cpu()][:, columns]
            weights = batch.get("pair_weight")
            if weights is not None:  # a pair left out of the loss needs no reference, only a finite number
                picked[weights.cpu() == 0] = 0.0
            # NaN: the pair's image failed during the precompute pass only. Every rank decides together: a
            # reference forward on some ranks only would stall ZeRO-3's collective parameter gathers.
            if not any_rank(torch.isnan(picked).any(), self.args.device):
                return picked[:, 0].to(self.args.device), picked[:, 1].to(self.args.device)
        if self._reference_released:  # the adapters-off policy is not that reference
            raise RuntimeError("the frozen reference was released after caching, yet a batch needs it again")
        # as the policy (also for the precompute pass, outside a step)
        with self.accelerator.autocast(), self.as_reference(model) as reference:
            ref = score_answers(reference, batch, self.step_options, self.pad_token_id, features, no_grad=True)
        return ref.chosen_logps.detach(), ref.rejected_logps.detach()

    @contextmanager
    def as_reference(self, model: nn.Module) -> Iterator[nn.Module | None]:
        """The reference model inside: the frozen copy, or the policy with its adapters off or (TR-DPO under LoRA)
        the snapshot swapped in; None where there is none (a released frozen copy; full fine-tuning with a
        reference-free loss, which keeps no copy)."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.reference_sync is not None and self.reference_sync.swaps_into_policy:
            unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)  # the parameters' names
            with self.reference_sync.reference.swapped_in(unwrapped):
                yield unwrapped
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            if self._reference_released or not hasattr(unwrapped, "disable_adapter"):
                yield None
            else:
                with unwrapped.disable_adapter():
                    yield unwrapped

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        self._length_sampler = EpochSeededLengthSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            dataset=dataset,
            lengths=dataset[self.args.length_column_name],
            seed=self.args.seed,
        )
        return self._length_sampler

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step >= self.state.max_steps:  # resumed from the last step: the Trainer would add one
            self.control.should_training_stop = True
            return None
        if self._evaluation_pending:
            self._rerun_cut_short_evaluation(kwargs["trial"], kwargs["ignore_keys_for_eval"])
            if self.control.should_training_stop:  # a stop signal during that evaluation too: stop here
                return None
        # On a resume the sampler sits under SkipBatchSampler(BatchSamplerShard(BatchSampler(...))), deeper than
        # the Trainer's set_epoch reaches: without this a resumed multi-rank run would replay epoch 0's order.
        sampler = getattr(self, "_length_sampler", None)
        if sampler is not None:
            sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _reference_table(self, mode: str) -> torch.Tensor | None:
        """The precomputed reference table for the train or eval set (computed or loaded on first use)."""
        if self.reference_cache is None:
            return None
        if not self._ref_tables:  # both splits at once, so a frozen reference copy can be released afterwards
            stop = self._stop_callback()
            with stop.interruptible() if stop is not None else nullcontext():
                for split, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                    if dataset is not None:
                        scoring = self._reference_pass(split)
                        self._ref_tables[split] = self.reference_cache.table(split, dataset, scoring)
            complete = all(not torch.isnan(table).any() for table in self._ref_tables.values())
            if self.ref_model is not None and complete:
                self.ref_model = None  # every pair has its reference log-probs: the copy is no longer needed
                self._reference_released = True
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.log_line("reference log-probs cached for every pair: released the frozen reference copy")
        return self._ref_tables.get(mode)

    def _reference_pass(self, split: str) -> ReferencePass:
        """How the reference cache scores a split: as this trainer's reference does, without the table (and the
        corrupted-image view too, as columns 2-3, where the split scores it)."""
        model = self.model
        views = [lambda batch: batch] + ([corrupted_view] if self.corrupted_views[split] else [])

        def score(batch: dict) -> tuple[torch.Tensor, ...]:
            logps: tuple[torch.Tensor, ...] = ()
            for view in (make(batch) for make in views):
                features = encode_images_once(model, view) if self.step_options.image_once else None
                logps += self.reference_scores(model, view, features, use_table=False)
            return logps

        return ReferencePass(
            score_batch=score,
            collate=self.data_collator if split == "train" else self.eval_data_collator,
            batch_size=self.dpo.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
            device=self.args.device,
            is_main=self.is_world_process_zero(),
            show_progress=self.is_world_process_zero() and not self.args.disable_tqdm,
            wait_for_everyone=self.accelerator.wait_for_everyone,
            say=self.log_line,
            columns=2 * len(views),
        )

    def score_batch(self, model: nn.Module, batch: dict) -> BatchScores:
        """Policy scores, reference log-probs and loss of one batch, as the training step computes them."""

        def reference(ref_batch: dict, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return self.reference_scores(model, ref_batch, features)

        # the whole step under the mixed-precision autocast (a no-op under DeepSpeed, which casts the model): the
        # chunked LM head runs outside the model's forward, and policy and reference must see the same numerics
        corrupted = self.corrupted_views["train" if model.training else "eval"]
        with self.accelerator.autocast():
            return score_batch(model, batch, self.step_options, self.objective, self.pad_token_id, reference, corrupted)

    def dpo_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and per-pair metric tensors for one batch."""
        scores = self.score_batch(model, batch)
        return scores.out.loss, batch_metrics(scores)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if any_rank(~torch.isfinite(loss).all(), loss.device):
            self._raise_non_finite(loss)

    def _raise_non_finite(self, loss: torch.Tensor) -> None:
        value = loss.item()  # every rank stops; one whose own loss is finite says the bad one is elsewhere
        where = f"value {value}" if not math.isfinite(value) else f"on another rank; this rank's is {value:.4g}"
        raise NonFiniteLossError(
            f"non-finite DPO loss at step {self.state.global_step + 1} ({where}); stopping before the "
            f"optimizer step. {untouched(Path(self.args.output_dir)).capitalize()}; lower the learning rate or "
            "check the data."
        )

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        """The Trainer's gradient norm of the step (computed whether or not it clips), checked before the optimizer
        applies it (DeepSpeed: after its engine stepped). Not under fp16, whose loss scaler skips the steps that
        overflow by design."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.args.fp16:
            working = Path(self.args.output_dir)
            check_grad_norm(norm, self.state.global_step + 1, working, deepspeed=self.is_deepspeed_enabled)
        return norm

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        loss, metrics = self.dpo_step(model, inputs)
        if model.training:
            self._reduce_train_step(loss, metrics, inputs)
        else:
            self._check_finite(loss)
            self._store_eval_metrics(metrics)
        return (loss, metrics) if return_outputs else loss

    def _reduce_train_step(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], batch: dict) -> None:
        """One all-reduce (and one wait for the device) per micro-batch for what every rank must agree on: whether
        any rank's loss is non-finite (raised before the optimizer step), TRL's `num_tokens` (prompt + chosen and
        prompt + rejected, media tokens included; kept in the Trainer state, so a resumed run counts on) and the
        metric sums: per name, the step's weighted mean over all ranks' pairs (TRL's gather-then-mean), averaged
        over the logging window by `log`."""
        masks = [batch[f"{name}_attention_mask"].sum() for name in ("prompt", "prompt", "chosen", "rejected")]
        weights = batch.get("pair_weight")
        left_out = (weights == 0).sum() if weights is not None else loss.new_zeros(())
        sums = self._metric_sums(metrics, "train")
        parts = [(~torch.isfinite(loss.detach()).all()).view(1), torch.stack(masks).sum().view(1),
                 left_out.to(loss.device).view(1), *sums.values()]  # fmt: skip
        reduced = self.accelerator.reduce(torch.cat([part.double() for part in parts]), "sum").tolist()
        if reduced[0] > 0:
            self._raise_non_finite(loss)
        self.state.num_input_tokens_seen += int(reduced[1])
        self._pairs_left_out += int(reduced[2])
        for index, name in enumerate(sums):
            total, count = reduced[3 + 2 * index : 5 + 2 * index]
            if count > 0:  # 0: every pair of the step had a failed image
                self._metrics["train"][name].append(total / count)

    def _stop_callback(self) -> PreemptionCallback | None:
        return next((c for c in self.callback_handler.callbacks if isinstance(c, PreemptionCallback)), None)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation; a stop signal during a mid-run evaluation ends it at the next batch and saves
        this step's checkpoint at once (no eval metrics are logged), instead of finishing it and training on."""
        try:
            return super().evaluate(*args, **kwargs)
        except EvaluationCutShort:
            self._metrics["eval"].clear()
            stop = self._stop_callback()
            stop.requested = stop.stopped = True
            self.log_line("stop signal during evaluation: saving this step's checkpoint (the resume evaluates it)")
            self._evaluation_cut_short = True
            self._save_checkpoint(self.model_wrapped, trial=None)
            self._evaluation_cut_short = False
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            self.control.should_save = False  # saved just now
            self.control.should_training_stop = True
            metric = self.args.metric_for_best_model  # save_strategy "best" reads it: NaN is never a new best
            return {} if metric is None else {metric if metric.startswith("eval_") else f"eval_{metric}": math.nan}

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """The evaluation batches through the evaluation collator (it adds the corrupted images the diagnostics
        score)."""
        collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        stop = self._stop_callback()
        if stop is not None and stop.training and any_rank(stop.requested, self.args.device):  # every rank, per batch
            raise EvaluationCutShort
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.dpo_step(model, inputs)
        self._store_eval_metrics(metrics)
        return loss.detach(), None, None

    # ----- metrics ------------------------------------------------------------------------------------------------
    def _metric_sums(self, metrics: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
        """Per metric name, this rank's (weighted sum, weight) of its pairs (train: the optimized `loss` left out,
        the Trainer logs it; eval: over every rank's pairs, each pair once)."""
        metrics = {name: values.detach().float() for name, values in metrics.items()}
        if mode == "train":
            metrics.pop("loss", None)
        else:  # the duplicates that pad the last batch across ranks are dropped
            metrics = self.accelerator.gather_for_metrics(metrics)
        weights = {name.split(":", 1)[1]: metrics.pop(name) for name in list(metrics) if name.startswith("weight:")}
        pair_weights = metrics.pop("weight")
        sums = {}
        for name, values in metrics.items():
            weight = weights.get(name, pair_weights)
            sums[name] = torch.stack([(values * weight).sum(), weight.sum()])
        return sums

    def _store_eval_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Sums and counts over every pair of the evaluation; its `loss` becomes `eval_loss`, so a pair left out of
        a batch's loss (weight 0) no longer counts in the Trainer's mean over batches."""
        for name, totals in self._metric_sums(metrics, "eval").items():
            self._metrics["eval"][name].append(totals.tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values and mode == "train":
                logs[f"{prefix}{name}"] = sum(values) / len(values)
            elif values:
                total, count = map(sum, zip(*values))
                if count > 0:
                    logs[f"{prefix}{name}"] = total / count
        self._metrics[mode].clear()
        if mode == "train":
            logs["num_tokens"] = float(self.state.num_input_tokens_seen)
        if "train_runtime" in logs and self._pairs_left_out:  # the end of train(): said in the summary line
            logs["pairs_left_out"] = self._pairs_left_out
        super().log(logs, start_time)
