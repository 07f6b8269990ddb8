"""`silkie annotate sample`: each instruction answered by k models of the pool (a seeded draw per instruction, as
VLFeedback drew 4 of its 12), with transformers `generate`; answers appended to `answers.jsonl` per batch, and a
rerun skips the (instruction, model) pairs already answered."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from silkie.config.annotate import PoolConfig, PoolModel
from silkie.models.family import PairTextError
from silkie.tools.annotate.files import ANSWER_FAILURES, ANSWERS, AppendLog, Instruction, read_jsonl
from silkie.tools.cli import ToolError

log = logging.getLogger(__name__)
BATCH = 8  # answers written (flushed) together


def assign_models(
    instructions: Sequence[Instruction], names: Sequence[str], k: int, seed: int, always: Sequence[str] = ()
) -> dict[str, list]:
    """For each instruction id, the models that answer it: every one of `always` (e.g. the policy being trained)
    and k drawn from the others (all when k >= their number), a draw seeded by the pool seed and the id, so it does
    not depend on the order or number of instructions."""
    names, others = list(names), [name for name in names if name not in always]
    plan = {}
    for row in instructions:
        rng = random.Random(f"{seed}:{row.id}")
        drawn = rng.sample(others, min(k, len(others)))
        plan[row.id] = sorted([*always, *drawn], key=names.index)
    return plan


def answer_seed(seed: int, row_id: str, model: str) -> int:
    """The sampling seed of one answer: the same on a rerun, different per instruction and model."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{row_id}\0{model}".encode()).digest()[:4], "little")


class Responder:
    """One pool model, loaded once, answering (image, question) prompts as `silkie chat` builds them."""

    def __init__(self, model: PoolModel, device: str = "auto"):
        from silkie.tools.chat import GenerationOptions, load_chat_model
        from silkie.tools.chat_inputs import qwen_vl_tokenizer

        self.spec = model
        self.chat = load_chat_model(model.path, model.adapter, model.dtype, device)
        self.tokenizer = qwen_vl_tokenizer(self.chat) if self.chat.family == "qwen_vl" else None
        self.prompter = None  # the other families' codec and processor, loaded at the first question
        sample = model.temperature > 0
        self.options = GenerationOptions(model.max_new_tokens, sample, model.top_p, model.temperature or 1.0)

    def inputs(self, image: str | Path, question: str) -> tuple[Any, Any, dict]:
        """(tokenizer, prompt ids [1, L], image tensors) of one question about one picture."""
        from silkie.models.qwen_vl.tokenization import DEFAULT_SYSTEM
        from silkie.tools.chat_inputs import FamilyPrompter, qwen_vl_inputs

        if self.tokenizer is not None:
            ids, tensors = qwen_vl_inputs(self.chat, self.tokenizer, [image], question, DEFAULT_SYSTEM, [])
            return self.tokenizer, ids, tensors
        if self.prompter is None:
            self.prompter = FamilyPrompter(self.chat.model_dir, self.chat.adapter_dir, self.chat.config)
        return self.prompter([image], [], question)

    def answer(self, image: str | Path, question: str, seed: int) -> str:
        """The model's answer (special tokens dropped, surrounding whitespace stripped)."""
        return self.reply(image, question, seed)[0]

    def reply(self, image: str | Path, question: str, seed: int) -> tuple[str, int, int]:
        """(answer, prompt tokens, generated tokens) of one question."""
        import torch

        from silkie.tools.chat import generate_kwargs

        tokenizer, ids, tensors = self.inputs(image, question)
        ids = ids.to(self.chat.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            kwargs = generate_kwargs(tokenizer, ids, self.chat.to_device(tensors), self.options)
            out = self.chat.model.generate(**kwargs)
        generated = out[0, ids.shape[1] :].tolist()
        return tokenizer.decode(generated, skip_special_tokens=True).strip(), int(ids.shape[1]), len(generated)


def shard_file(index: int, count: int) -> str:
    """The answers file of shard `index` of `count` (merged into answers.jsonl when all are done)."""
    return f"answers.shard-{index}-of-{count}.jsonl"


def failed_answers(out: Path) -> set[tuple[str, str]]:
    """(instruction id, model) pairs that could not be answered (an unreadable image, markers that disagree)."""
    files = [out / ANSWER_FAILURES, *sorted(out.glob("answer_failures.shard-*.jsonl"))]
    return {(r["id"], r["model"]) for path in files for r in read_jsonl(path)}


def answered(out: Path) -> set[tuple[str, str]]:
    """(instruction id, model) pairs answered, in answers.jsonl or any shard file."""
    files = [out / ANSWERS, *sorted(out.glob("answers.shard-*.jsonl"))]
    return {(r["id"], r["model"]) for path in files for r in read_jsonl(path)}


def sample_answers(
    pool: PoolConfig,
    instructions: Sequence[Instruction],
    out: Path,
    progress: bool = True,
    always: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
) -> dict:
    """Answer every instruction with its drawn pool models (and the `always` ones); with `shard` (index, count)
    only the instructions at index = i mod count, into the shard's own file. Returns {answers, new, per_model}."""
    from tqdm import tqdm

    names = [model.label for model in pool.models]
    plan = assign_models(instructions, names, pool.answers_per_instruction, pool.seed, always)
    if shard is not None:
        instructions = [row for i, row in enumerate(instructions) if i % shard[1] == shard[0]]
    target = out / (ANSWERS if shard is None else shard_file(*shard))
    answers = AppendLog(target)  # first: a torn last line is cut before what is done is read
    failures = AppendLog(out / (ANSWER_FAILURES if shard is None else f"answer_failures.shard-{shard[0]}.jsonl"))
    done = answered(out) | failed_answers(out)
    new = 0
    for model in pool.models:
        todo = [row for row in instructions if model.label in plan[row.id] and (row.id, model.label) not in done]
        if not todo:
            continue
        log.info("%s: %d instructions to answer", model.label, len(todo))
        responder = Responder(model, pool.device)
        bar = tqdm(total=len(todo), desc=model.label, unit="answer", disable=not progress)
        for start in range(0, len(todo), BATCH):
            batch = todo[start : start + BATCH]
            records = []
            for row in batch:
                seed = answer_seed(pool.seed, row.id, model.label)
                try:
                    text = responder.answer(out / row.image, row.prompt, seed)
                except (ToolError, ValueError, PairTextError) as err:  # this row can't be a prompt for this model
                    log.warning("%s: %s left unanswered: %s", model.label, row.id, err)
                    failures.write([{"id": row.id, "model": model.label, "reason": str(err)}])
                    continue
                records.append({"id": row.id, "model": model.label, "response": text})
            answers.write(records)
            new += len(records)
            bar.update(len(batch))
        bar.close()
        del responder
    per_model = Counter(r["model"] for r in read_jsonl(target))
    return {"answers": sum(per_model.values()), "new": new, "per_model": dict(per_model)}


def merge_shards(out: Path) -> int:
    """Append the shard files' answers not in answers.jsonl yet, then remove the shard files; returns how many."""
    done = {(r["id"], r["model"]) for r in read_jsonl(out / ANSWERS)}
    answers, added = AppendLog(out / ANSWERS), 0
    for path in sorted(out.glob("answers.shard-*.jsonl")):
        records = [r for r in read_jsonl(path) if (r["id"], r["model"]) not in done]
        answers.write(records)
        done |= {(r["id"], r["model"]) for r in records}
        added += len(records)
        path.unlink()  # after its records are durably in answers.jsonl
    return added
