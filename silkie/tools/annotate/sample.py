"""`silkie annotate sample`: each instruction answered by k models of the pool (a seeded draw per instruction, as
VLFeedback drew 4 of its 12), in batches with transformers `generate` (or vLLM, `vllm_backend`); answers appended
to `answers.jsonl` per batch, and a rerun skips the (instruction, model) pairs already answered."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from silkie.config.annotate import PoolConfig, PoolModel
from silkie.models.family import PairTextError
from silkie.tools.annotate.files import (
    ANSWER_FAILURES,
    ANSWERS,
    AppendLog,
    Instruction,
    being_written,
    read_jsonl,
    writer_lock,
)
from silkie.tools.cli import ToolError

if TYPE_CHECKING:
    from silkie.tools.generation import Answer

log = logging.getLogger(__name__)


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


def replaced_plan(plan: dict, names: Sequence[str], failed: set[tuple[str, str]], seed: int,
                  always: Sequence[str] = ()) -> dict[str, list]:  # fmt: skip
    """`plan` with a replacement for each drawn model that could not take an instruction (`failed`: (id, model)):
    the next of the pool's other models in an order seeded by the pool seed and the id, until the instruction has
    as many answering drawn models as it was given, or the pool runs out (the `always` ones are not replaced). The
    same failures give the same plan, on a rerun too. Where every drawn model failed, the instruction is at fault
    (an unreadable image, markers that disagree), not a model: no replacement is loaded for it."""
    replaced = {}
    for row_id, models in plan.items():
        drawn = [name for name in models if name not in always]
        if all((row_id, name) in failed for name in drawn):
            replaced[row_id] = models
            continue
        spare = [name for name in names if name not in always and name not in drawn]
        random.Random(f"{seed}:{row_id}:replace").shuffle(spare)
        tried, working = [], 0
        for name in [*drawn, *spare]:
            if working == len(drawn):
                break
            tried.append(name)
            working += (row_id, name) not in failed
        replaced[row_id] = sorted([*[name for name in models if name in always], *tried], key=list(names).index)
    return replaced


def answer_seed(seed: int, row_id: str, model: str) -> int:
    """The sampling seed of one answer: the same on a rerun, different per instruction and model."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{row_id}\0{model}".encode()).digest()[:4], "little")


class Responder:
    """One pool model, loaded once, answering (image, question) prompts as `silkie chat` builds them."""

    def __init__(self, model: PoolModel, device: str = "auto"):
        from silkie.tools.chat import GenerationOptions, load_chat_model
        from silkie.tools.chat_inputs import PromptBuilder
        from silkie.tools.common import refuse_template_kwargs

        self.spec = model
        self.chat = load_chat_model(model.path, model.adapter, model.dtype, device)
        refuse_template_kwargs(model.chat_template_kwargs, model.label, self.chat.family)
        self.prompt = PromptBuilder(self.chat, model.chat_template_kwargs)
        sample = model.temperature > 0
        self.options = GenerationOptions(model.max_new_tokens, sample, model.top_p, model.temperature or 1.0)

    def inputs(self, image: str | Path, question: str) -> tuple[Any, Any, dict]:
        """(tokenizer, prompt ids [1, L], image tensors) of one question about one picture."""
        return self.prompt(image, question)

    def answer(self, image: str | Path, question: str, seed: int) -> str:
        """The model's answer (special tokens dropped, surrounding whitespace stripped)."""
        return self.reply(image, question, seed)[0]

    def reply(self, image: str | Path, question: str, seed: int) -> Answer:
        """The answer to one question (its text, token counts and whether it ended at a stop token)."""
        return self.replies([self.inputs(image, question)], [seed])[0]

    def replies(self, prompts: Sequence[tuple], seeds: Sequence[int]) -> list[Answer]:
        """`reply` of several prompts (what `inputs` returns for each) generated in one batch; each answer is the
        one it would be alone (its own seed)."""
        from silkie.tools.generation import generate_batch

        pairs = [(ids, tensors) for _, ids, tensors in prompts]
        return generate_batch(self.chat, prompts[0][0], pairs, self.options, seeds)


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


def check_pool_folders(pool: PoolConfig, where: str = "pool") -> None:
    """ToolError naming the first pool model whose checkpoint (or adapter) folder is missing or of no family Silkie
    loads, before any model answers (else the pool's last model would fail after the first ones had run)."""
    from silkie.tools.cli import require_dir
    from silkie.tools.common import family_of, refuse_template_kwargs

    for index, model in enumerate(pool.models):
        entry = f"{where}: models[{index}]"
        try:
            family = family_of(Path(model.path).expanduser())
        except ToolError as err:
            raise ToolError(f"{entry}.path: {err}") from err
        refuse_template_kwargs(model.chat_template_kwargs, model.label, family)
        if model.adapter:
            try:
                require_dir(Path(model.adapter).expanduser(), "adapter folder", "adapter_config.json")
            except ToolError as err:
                raise ToolError(f"{entry}.adapter: {err}") from err


def sample_answers(
    pool: PoolConfig,
    instructions: Sequence[Instruction],
    out: Path,
    progress: bool = True,
    always: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
) -> dict:
    """Answer every instruction with its drawn pool models (and the `always` ones); with `shard` (index, count)
    only the instructions at index = i mod count, into the shard's own file (locked while it is written). Without
    a shard, finished shards of an earlier run are merged first. Returns {answers, new, per_model}."""
    check_pool_folders(pool)
    names = [model.label for model in pool.models]
    plan = assign_models(instructions, names, pool.answers_per_instruction, pool.seed, always)
    if shard is not None:
        instructions = [row for i, row in enumerate(instructions) if i % shard[1] == shard[0]]
    target = out / (ANSWERS if shard is None else shard_file(*shard))
    if shard is None:
        merge_shards(out)
    with writer_lock(target) if shard is not None else contextlib.nullcontext():
        new = _answer_all(pool, instructions, plan, out, target, progress, shard)
        drawn = plan
        for _ in names:  # a replacement may fail too: at most a pass per pool model
            replaced = replaced_plan(drawn, names, failed_answers(out), pool.seed, always)
            if replaced == plan:
                break
            plan = replaced
            new += _answer_all(pool, instructions, plan, out, target, progress, shard)
    per_model = Counter(r["model"] for r in read_jsonl(target))
    return {"answers": sum(per_model.values()), "new": new, "per_model": dict(per_model)}


def make_responder(model: PoolModel, device: str, out: Path) -> Any:
    """The pool model's answerer on the backend `choose_backend` picks."""
    from silkie.tools.annotate.vllm_backend import VllmResponder, choose_backend

    if choose_backend(model, device) == "vllm":
        log.info("%s: answering with vLLM", model.label)
        return VllmResponder(model, out)
    return Responder(model, device)


def _answer_all(
    pool: PoolConfig, instructions: Sequence[Instruction], plan: dict, out: Path, target: Path, progress: bool,
    shard: tuple[int, int] | None,
) -> int:  # fmt: skip
    """Answer what is not done yet, model by model, a batch at a time; returns how many answers were written."""
    from tqdm import tqdm

    answers = AppendLog(target)  # first: a torn last line is cut before what is done is read
    failures = AppendLog(out / (ANSWER_FAILURES if shard is None else f"answer_failures.shard-{shard[0]}.jsonl"))
    done = answered(out) | failed_answers(out)
    new = 0
    for model in pool.models:
        todo = [row for row in instructions if model.label in plan[row.id] and (row.id, model.label) not in done]
        if not todo:
            continue
        log.info("%s: %d instructions to answer", model.label, len(todo))
        responder = make_responder(model, pool.device, out)
        bar = tqdm(total=len(todo), desc=model.label, unit="answer", disable=not progress)
        for start in range(0, len(todo), model.batch_size):
            batch, prompts = todo[start : start + model.batch_size], []
            for row in batch:
                try:
                    prompts.append((row, responder.inputs(out / row.image, row.prompt)))
                except (ToolError, ValueError, PairTextError) as err:  # this row can't be a prompt for this model
                    log.warning("%s: %s left unanswered: %s", model.label, row.id, err)
                    failures.write([{"id": row.id, "model": model.label, "reason": str(err)}])
            seeds = [answer_seed(pool.seed, row.id, model.label) for row, _ in prompts]
            texts = responder.replies([inputs for _, inputs in prompts], seeds) if prompts else []
            answers.write(
                {"id": row.id, "model": model.label, "response": text}
                for (row, _), (text, *_) in zip(prompts, texts, strict=True)
            )
            new += len(prompts)
            bar.update(len(batch))
        bar.close()
        del responder
    return new


def merge_shards(out: Path) -> int:
    """Append the finished shard files' answers not in answers.jsonl yet, then remove those files; a shard still
    being written (its process holds the lock) is left for later. Returns how many answers were added."""
    done = {(r["id"], r["model"]) for r in read_jsonl(out / ANSWERS)}
    answers, added = AppendLog(out / ANSWERS), 0
    for path in sorted(out.glob("answers.shard-*.jsonl")):
        if being_written(path):
            log.warning("%s is still being written (a shard runs now): merged when it is done", path.name)
            continue
        records = [r for r in read_jsonl(path) if (r["id"], r["model"]) not in done]
        answers.write(records)
        done |= {(r["id"], r["model"]) for r in records}
        added += len(records)
        path.unlink()  # after its records are durably in answers.jsonl
        Path(f"{path}.lock").unlink(missing_ok=True)
    return added
