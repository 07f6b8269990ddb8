"""The `silkie` model of lmms-eval: `lmms-eval --model silkie --model_args path=BASE,adapter=ADAPTER` evaluates a base
checkpoint of any family Silkie trains (native Qwen-VL-Chat included), with or without a LoRA adapter.

Prompts are built as `silkie chat` builds them (the run's chat format and image processing); answers are generated
in batches (`batch_size` per `generate` call, greedy unless the task samples) and cut at the task's stop strings.
`loglikelihood` scores the continuation as the model's answer to the context. Registered through the
`lmms_eval.models` entry point of this package; imported by lmms-eval only (it needs the `.[eval]` extra)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

MODEL_ID = "silkie"
IMAGE_MARKER = re.compile(r"<image>")
MODEL_ARGS = ("path", "adapter", "device", "dtype", "batch_size", "max_new_tokens")


def manifest() -> Any:
    """The entry point's payload: the `silkie` model id and its class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SilkieLMM")


def request_seed(task: str, doc_id: int) -> int:
    """A sampling seed per (task, document): a rerun samples the same answers, in any batch."""
    return int.from_bytes(hashlib.sha256(f"{task}/{doc_id}".encode()).digest()[:4], "little")


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as answer tokens (no special tokens added)."""
    if hasattr(tokenizer, "im_end_id"):  # the native Qwen-VL tokenizer
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first of the stop strings (empty ones ignored)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


class SilkieLMM(lmms):
    """A Silkie base model (+ adapter) as an lmms-eval simple model; `use_adapter = False` evaluates the base with
    the adapter disabled, so base and DPO model come from one load."""

    is_simple = True

    def __init__(
        self,
        path: str,
        adapter: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_new_tokens: int | str = 256,
        **unknown: Any,
    ) -> None:
        super().__init__()
        from accelerate import PartialState

        from silkie.tools.chat import load_chat_model
        from silkie.tools.chat_inputs import PromptBuilder

        if unknown:
            raise ValueError(f"silkie: unknown model_args {sorted(unknown)}; expected {', '.join(MODEL_ARGS)}")
        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        if device == "auto" and state.num_processes > 1:
            device = str(state.device)
        self.chat = load_chat_model(path, adapter or None, dtype, device)
        self.chat.model.eval()
        self.prompt = PromptBuilder(self.chat)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.use_adapter = True
        self._pictures = tempfile.TemporaryDirectory(prefix="silkie-lmms-")

    @property
    def batch_size(self) -> int:
        """Prompts per `generate` call."""
        return self.batch_size_per_gpu

    def adapter_context(self) -> Any:
        """The adapter disabled when `use_adapter` is off (and the model has one), else nothing."""
        if self.use_adapter or not hasattr(self.chat.model, "disable_adapter"):
            return contextlib.nullcontext()
        return self.chat.model.disable_adapter()

    def _inputs(self, context: str, visuals: list, key: str) -> tuple:
        """(tokenizer, ids [1, L], tensors) of a request; its pictures written once as PNG files (prompts take
        paths, as in training). `<image>` markers place the pictures when they match their number."""
        paths = []
        for index, picture in enumerate(visuals or []):
            if not hasattr(picture, "save"):
                raise ValueError(f"silkie: request {key} has a {type(picture).__name__} visual; expected images")
            target = Path(self._pictures.name) / f"{key}-{index}.png"
            picture.convert("RGB").save(target, compress_level=1)
            paths.append(str(target))
        if len(IMAGE_MARKER.findall(context)) != len(paths):
            context = IMAGE_MARKER.sub("", context).strip()
        return self.prompt(paths, context)

    @staticmethod
    def _visuals(doc_to_visual: Any, doc: dict) -> list:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        return [v for item in visuals for v in (item if isinstance(item, list) else [item])]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or the task's sampling) answers, `batch_size` prompts per `generate` call, in request order."""
        from silkie.tools.chat import GenerationOptions
        from silkie.tools.generation import generate_batch

        def order(args: tuple) -> tuple:
            return -len(args[0]), args[0]

        ordered = utils.Collator([request.args for request in requests], order, grouping=True)
        answers, bar = [], tqdm(total=len(requests), disable=self.rank != 0, desc="silkie answering")
        for chunk in ordered.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            kwargs = dict(all_kwargs[0])
            stops = kwargs.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            temperature = float(kwargs.get("temperature") or 0)
            options = GenerationOptions(
                max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                sample=bool(kwargs.get("do_sample")) and temperature > 0,
                top_p=float(kwargs.get("top_p") or 1.0),
                temperature=temperature or 1.0,
            )
            prompts = []
            for context, visual, doc_id, task, split in zip(contexts, doc_to_visual, doc_ids, tasks, splits):
                doc = self.task_dict[task][split][doc_id]
                prompts.append(self._inputs(context, self._visuals(visual, doc), f"{task}-{doc_id}"))
            seeds = [request_seed(task, doc_id) for task, doc_id in zip(tasks, doc_ids)]
            with self.adapter_context():
                replies = generate_batch(self.chat, prompts[0][0], [p[1:] for p in prompts], options, seeds)
            for (text, *_), context in zip(replies, contexts):
                text = cut_at(text, stops)
                answers.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return ordered.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(loss, greedy) per request: the mean negative log-likelihood per token of the continuation as the model's
        answer to the context (lmms-eval's convention, as its own models return the forward's loss: its
        multiple_choice picks the lowest), and whether greedy decoding gives exactly that continuation. The
        target's leading delimiter whitespace is not scored."""
        scores = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="silkie scoring"
        ):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            tokenizer, ids, tensors = self._inputs(context, self._visuals(doc_to_visual, doc), f"{task}-{doc_id}")
            scores.append(self._score(tokenizer, ids, tensors, str(continuation).lstrip()))
        return scores

    def _score(self, tokenizer: Any, ids: torch.Tensor, tensors: dict, continuation: str) -> tuple[float, bool]:
        from silkie.tools.generation import PADDED_PER_TOKEN

        answer = torch.tensor([continuation_ids(tokenizer, continuation)], dtype=ids.dtype)
        full = torch.cat([ids, answer], dim=1)
        for key in PADDED_PER_TOKEN:  # per-token inputs: the answer is text
            if key in tensors:
                tensors = {**tensors, key: torch.cat([tensors[key], torch.zeros_like(answer)], dim=1)}
        with torch.no_grad(), self.adapter_context():
            logits = self.chat.model(
                input_ids=full.to(self.chat.device),
                attention_mask=torch.ones_like(full).to(self.chat.device),
                use_cache=False,
                **self.chat.to_device(tensors),
            ).logits
        predicted = logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
        targets = answer[0].to(predicted.device)
        loss = -predicted.gather(1, targets[:, None]).mean()
        return float(loss), bool((predicted.argmax(-1) == targets).all())

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Multi-round tasks need the conversation API, which this model does not implement."""
        raise NotImplementedError("silkie: multi-round (generate_until_multi_round) tasks are not supported")
