"""TRL's `generate_during_eval`: at each evaluation, greedy answers of the policy and of the reference to the first
held-out prompts (pictures and videos included), appended to `<working>/eval_samples.jsonl` and shown in
TensorBoard's text tab, to watch the answers change while the reward metrics move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from silkie.config.objective import uses_reference
from silkie.logs import get_logger
from silkie.models.generation import (
    decode_answer,
    pad_token_id,
    prompt_generation_inputs,
    stop_token_ids,
    text_tokenizer,
)
from silkie.models.kernels import eager_blocks

from .metrics import append_jsonl
from .preemption import any_rank

logger = get_logger(__name__)


def sample_rows(dataset: Any, count: int) -> list[int]:
    """Indices of the first `count` held-out pairs with distinct prompts (a prompt's other pairs add nothing)."""
    picked, seen = [], set()
    for index, prompt_id in enumerate(dataset["prompt_id"]):
        if prompt_id not in seen:
            seen.add(prompt_id)
            picked.append(index)
            if len(picked) == count:
                break
    return picked


def greedy_answer(model: nn.Module, inputs: dict, tokenizer: Any, max_new_tokens: int) -> tuple[str, int]:
    """(answer text, generated tokens up to and with the stop token) of one prompt, greedy."""
    stops = stop_token_ids(tokenizer, model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad_token_id(tokenizer))  # fmt: skip
    text, tokens, _ = decode_answer(tokenizer, out[0, inputs["input_ids"].shape[1] :].tolist(), stops)
    return text, tokens


def _text(tokenizer: Any, ids: list[int]) -> str:
    """Ids as readable text: special tokens (the chat template's, image placeholders) left out."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class EvalSamplesCallback(TrainerCallback):
    """After each evaluation: the policy's and the reference's answers to the sample prompts (every rank
    generates, as ZeRO-3's gathers need; the main process writes)."""

    def __init__(self, trainer: Any, codec: Any, path: Path, count: int, max_new_tokens: int):
        self.trainer = trainer
        self.tokenizer = text_tokenizer(codec)
        self.path = path
        self.rows = sample_rows(trainer.eval_dataset, count)
        self.max_new_tokens = max_new_tokens
        self.said = False

    def on_evaluate(self, args, state, control, **kwargs):
        records = self.answers(state.global_step)
        if not state.is_world_process_zero:
            return control
        for record in records:
            append_jsonl(self.path, record)
        self._show(records, state.global_step)
        if not self.said:
            logger.info(f"eval samples: {self.path} (policy and reference answers at each evaluation)")
            self.said = True
        return control

    def answers(self, step: int) -> list[dict]:
        """One record per sample prompt: its texts and both models' answers. The reference's is None where the
        objective has none (cpo, simpo, orpo) or its frozen copy was released after the reference cache was built.
        Compiled decoder blocks run eager here (a cache per layer would compile a variant per layer); a stop signal
        ends the generation at the next prompt, on every rank together."""
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        dataset = trainer.eval_dataset
        stop = trainer._stop_callback()
        training = policy.training
        policy.eval()
        records = []
        models = [model for model in (policy, trainer.ref_model) if model is not None]
        try:
            with eager_blocks(*models):
                for index in self.rows:
                    if stop is not None and any_rank(stop.requested, trainer.args.device):
                        break
                    records.append(self._answer(policy, dataset[index], step))
        finally:
            policy.train(training)
        return records

    def _answer(self, policy: nn.Module, row: dict, step: int) -> dict:
        trainer, tokenizer = self.trainer, self.tokenizer
        batch = trainer.eval_data_collator([row])
        record = {"step": step, "prompt_id": row["prompt_id"], "images": row["images"], "videos": row["videos"],
                  "prompt": tokenizer.decode(row["prompt_input_ids"])}  # fmt: skip  (the chat layout kept)
        for name in ("chosen", "rejected"):
            record[name] = _text(tokenizer, row[f"{name}_input_ids"])
        with trainer.accelerator.autocast():
            inputs = prompt_generation_inputs(policy, batch)
            record["policy"], record["policy_tokens"] = greedy_answer(policy, inputs, tokenizer, self.max_new_tokens)
            answer = (None, 0)
            if uses_reference(trainer.dpo.loss_type):
                with trainer.as_reference(trainer.model) as reference:
                    if reference is not None:
                        reference = trainer.accelerator.unwrap_model(reference)
                        answer = greedy_answer(reference, inputs, tokenizer, self.max_new_tokens)
            record["reference"], record["reference_tokens"] = answer
        return record

    def _show(self, records: list[dict], step: int) -> None:
        """The answers as TensorBoard text (where the run reports to TensorBoard)."""
        board = next((c for c in self.trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
        writer = getattr(board, "tb_writer", None)
        if writer is None:
            return
        for number, record in enumerate(records):
            text = f"**prompt** {record['prompt']}\n\n**chosen** {record['chosen']}\n\n**policy** {record['policy']}"
            if record["reference"] is not None:
                text += f"\n\n**reference** {record['reference']}"
            writer.add_text(f"eval_samples/{number}", text, step)
        writer.flush()
