"""The data engine's two files (torch-free): `pool.yaml` (which models answer the instructions, how they decode)
and `judge.yaml` (who rates the answers: an OpenAI-compatible endpoint, a local checkpoint, or a Python function)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from silkie.errors import RecipeError

from .checks import choice, key, require
from .cluster import SlurmSection
from .model_section import check_chat_template_kwargs
from .recipe import _build_section
from .yaml_io import parse_yaml, yaml_error

JUDGE_KINDS = ("openai", "local", "python")
BACKENDS = ("auto", "transformers", "vllm")
SAMPLE_JOB_NAME = "silkie-annotate"


@dataclass
class PoolModel:
    """One model of the answering pool."""

    path: str = key(
        "",
        "Checkpoint folder (any family Silkie loads: qwen_vl, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, llava, "
        "internvl, gemma3, gemma4, qwen3_5, qwen3_5_moe).",
        "",
    )
    name: str | None = key(None, "The answer's `model` in the release (null: the folder's name).", "")
    adapter: str | None = key(None, "A LoRA adapter folder on top of `path` (e.g. a run's adapter/).", "")
    max_new_tokens: int = key(256, "Answer length limit in tokens.", "")
    temperature: float = key(0.7, "Sampling temperature; 0 = greedy decoding.", "")
    top_p: float = key(0.9, "Nucleus mass when sampling.", "")
    dtype: str = key("auto", "Weights dtype: auto (bf16 on GPUs, fp32 on CPU), bf16, fp16 or fp32.", "")
    batch_size: int = key(8, "Prompts generated together (transformers backend; vLLM schedules its own).", "")
    backend: str = key(
        "auto", "transformers (`generate`), vllm, or auto: vllm when it is installed and a GPU is here.", ""
    )
    chat_template_kwargs: dict | None = key(
        None,
        "Variables of the model's chat template for its prompts, e.g. {enable_thinking: false} (Qwen3.5) (null: "
        "those of the adapter's run, else none); not for qwen_vl.",
        "",
    )

    @property
    def label(self) -> str:
        """The name written into the release."""
        return self.name or Path(self.path).name

    def check(self, where: str) -> None:
        require(bool(self.path), f"{where}.path", self.path, "a checkpoint folder")
        require(self.max_new_tokens >= 1, f"{where}.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        require(self.temperature >= 0, f"{where}.temperature", self.temperature, "a number >= 0")
        require(0 < self.top_p <= 1, f"{where}.top_p", self.top_p, "a number in (0, 1]")
        require(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "an integer >= 1")
        choice(f"{where}.backend", self.backend, BACKENDS)
        check_chat_template_kwargs(self.chat_template_kwargs, f"{where}.chat_template_kwargs")


@dataclass
class PoolConfig:
    """`pool.yaml`: the models and how many of them answer each instruction."""

    models: list[PoolModel] = key(None, "The pool: a list of models (path, name, adapter, decoding).", "", list)
    answers_per_instruction: int = key(
        4, "k: how many pool models answer each instruction (a seeded draw per instruction; all when k >= pool).", ""
    )
    seed: int = key(0, "Seed of the draw and of sampling.", "")
    device: str = key("auto", "cpu, cuda, ... (auto: GPU when present).", "")
    slurm: SlurmSection = key(
        None, "`sample --gpus N`: the Slurm job's settings (the recipe's `slurm:` keys; job_name silkie-annotate).",
        "", lambda: SlurmSection(job_name=SAMPLE_JOB_NAME),
    )  # fmt: skip

    def check(self) -> None:
        self.slurm.check()
        require(bool(self.models), "pool.models", self.models, "a non-empty list of models")
        for index, model in enumerate(self.models):
            model.check(f"pool.models[{index}]")
        names = [model.label for model in self.models]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        require(duplicate is None, "pool.models", duplicate, "distinct model names (set `name`)")
        require(self.answers_per_instruction >= 2, "pool.answers_per_instruction", self.answers_per_instruction,
                "an integer >= 2 (pairs need two answers)")  # fmt: skip


@dataclass
class JudgeConfig:
    """`judge.yaml`: who rates each instruction's answers on VLFeedback's three aspects, 1-5."""

    kind: str = key("openai", "openai (any OpenAI-compatible endpoint), local (a checkpoint), python (a function).", "")
    model: str = key("", "openai: the model name (gpt-4o, ...); local: the checkpoint folder.", "")
    base_url: str | None = key(
        None, "openai: the endpoint (null: api.openai.com; `vllm serve`: http://host:8000/v1).", ""
    )
    api_key_env: str = key("OPENAI_API_KEY", "openai: the environment variable holding the key.", "")
    adapter: str | None = key(None, "local: a LoRA adapter folder on top of `model`.", "")
    chat_template_kwargs: dict | None = key(
        None,
        "local: variables of the judge's chat template, e.g. {enable_thinking: false} (null: those of the adapter's "
        "run, else none); not for qwen_vl.",
        "",
    )
    function: str | None = key(None, "python: `module:function(prompt, image_path, answers) -> text`.", "")
    concurrency: int = key(4, "Requests in flight at once.", "")
    max_retries: int = key(3, "Retries of a failed request or an unparseable answer before it is counted out.", "")
    backoff_seconds: float = key(2.0, "First retry delay; doubles each retry (plus jitter).", "")
    requests_per_minute: float | None = key(None, "Rate limit (null: none).", "")
    timeout_seconds: float = key(120.0, "openai: one request's timeout.", "")
    max_tokens: int = key(1024, "The judge's answer length limit.", "")
    temperature: float = key(0.0, "The judge's sampling temperature.", "")
    price_per_million_input: float = key(0.0, "Cost accounting: price per 1M prompt tokens.", "")
    price_per_million_output: float = key(0.0, "Cost accounting: price per 1M completion tokens.", "")

    def check(self) -> None:
        choice("judge.kind", self.kind, JUDGE_KINDS)
        if self.kind == "python":
            require(bool(self.function and ":" in self.function), "judge.function", self.function, "module:function")
        else:
            require(bool(self.model), "judge.model", self.model, "a model name (openai) or checkpoint folder (local)")
        require(self.concurrency >= 1, "judge.concurrency", self.concurrency, "an integer >= 1")
        require(self.max_retries >= 0, "judge.max_retries", self.max_retries, "an integer >= 0")
        require(self.backoff_seconds >= 0, "judge.backoff_seconds", self.backoff_seconds, "a number >= 0")
        rpm = self.requests_per_minute
        require(rpm is None or rpm > 0, "judge.requests_per_minute", rpm, "null or a number > 0")
        check_chat_template_kwargs(self.chat_template_kwargs, "judge.chat_template_kwargs")
        require(
            self.chat_template_kwargs is None or self.kind == "local",
            "judge.chat_template_kwargs",
            self.chat_template_kwargs,
            "null unless judge.kind is local (an endpoint renders its own prompts)",
        )


@dataclass
class RoundsConfig:
    """`rounds.yaml`: on-policy iterations: the current policy (+ the pool) answers, the judge rates, DPO trains from
    the last round's policy, N times."""

    rounds: int = key(2, "How many sample -> judge -> DPO rounds.", "")
    recipe: str = key("", "The DPO recipe every round trains with; its model.path is the first round's policy.", "")
    overrides: list[str] = key(None, "Recipe overrides for every round (as on the launch command line).", "", list)
    launch_args: list[str] = key(None, "Extra launcher arguments, e.g. [--gpus, '16', --wait] for Slurm.", "", list)
    instructions: str = key("", "Instructions jsonl (as `silkie annotate sample --instructions`).", "")
    images: str = key("", "Folder or zip the instructions' images are under.", "")
    limit: int | None = key(None, "Only the first N instructions.", "")
    judge: str = key("", "judge.yaml.", "")
    pool: str | None = key(None, "pool.yaml of models answering beside the policy (null: the policy alone).", "")
    policy_answers: int = key(2, "Answers the current policy samples per instruction (each its own seed).", "")
    policy_temperature: float = key(0.7, "The policy's sampling temperature.", "")
    policy_max_new_tokens: int = key(256, "The policy's answer length limit.", "")

    def check(self) -> None:
        require(self.rounds >= 1, "rounds.rounds", self.rounds, "an integer >= 1")
        for name in ("recipe", "instructions", "images", "judge"):
            require(bool(getattr(self, name)), f"rounds.{name}", getattr(self, name), "a file or folder path")
        require(self.policy_answers >= 1, "rounds.policy_answers", self.policy_answers, "an integer >= 1")
        require(self.policy_temperature >= 0, "rounds.policy_temperature", self.policy_temperature, "a number >= 0")
        if self.pool is None:
            require(self.policy_answers >= 2, "rounds.policy_answers", self.policy_answers,
                    "an integer >= 2 without a pool (pairs need two answers)")  # fmt: skip


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """The dataclass from its mapping, keys and types checked as the recipe's sections are; a pool's `models` list
    item by item."""
    if cls is not PoolConfig or not isinstance(raw, dict) or "models" not in raw:
        return _build_section(cls, raw, prefix)
    models = raw["models"]
    if not isinstance(models, list):
        raise RecipeError(f"{prefix}.models must be a list of models, got {type(models).__name__}")
    pool = _build_section(cls, {k: v for k, v in raw.items() if k not in ("models", "slurm")}, prefix)
    if "slurm" in raw:
        slurm = raw["slurm"]
        slurm = {"job_name": SAMPLE_JOB_NAME, **slurm} if isinstance(slurm, dict) else slurm
        pool.slurm = _build_section(SlurmSection, slurm, f"{prefix}.slurm")
    pool.models = [_build_section(PoolModel, item, f"{prefix}.models[{i}]") for i, item in enumerate(models)]
    return pool


def _load(path: str | Path, cls: type, prefix: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{prefix} file not found: {path}")
    try:
        raw = parse_yaml(path.read_text()) or {}
        built = _build(cls, raw, prefix)
        built.check()
    except yaml.YAMLError as err:
        raise RecipeError(yaml_error(err, str(path))) from None
    except RecipeError as err:  # the shared checks say "recipe:"; this is the pool or judge file
        raise RecipeError(f"{path}: {str(err).removeprefix('recipe: ')}") from None
    return built


def load_pool(path: str | Path) -> PoolConfig:
    """Read and check `pool.yaml`; errors name the file and key."""
    return _load(path, PoolConfig, "pool")


def load_rounds(path: str | Path) -> RoundsConfig:
    """Read and check `rounds.yaml`; errors name the file and key."""
    return _load(path, RoundsConfig, "rounds")


def load_judge(path: str | Path) -> JudgeConfig:
    """Read and check `judge.yaml`; errors name the file and key."""
    return _load(path, JudgeConfig, "judge")
