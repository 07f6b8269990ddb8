"""The recipe's sections as typed dataclasses, each with its own value checks. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import choice, require
from .names import FAMILIES
from .objective import objective_problem


@dataclass
class ModelSection:
    """Which checkpoint to train and how to load it."""

    path: str = ""
    family: str = "qwen_vl"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None

    def check(self) -> None:
        require(bool(self.path), "model.path", self.path, "a checkpoint folder (config.json, weights, tokenizer)")
        choice("model.family", self.family, FAMILIES)
        choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flex_attention"))
        require(
            self.family == "qwen_vl" or self.attn_implementation != "flex_attention",
            "model.attn_implementation",
            self.attn_implementation,
            f"sdpa or eager for family {self.family} (flex_attention is implemented for qwen_vl)",
        )
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"model.{name}", value, "null or an integer >= 1")
            require(
                value is None or self.family in ("qwen2_vl", "qwen2_5_vl"),
                f"model.{name}",
                value,
                "null: only qwen2_vl/qwen2_5_vl take per-image pixel bounds",
            )
        if self.min_pixels is not None and self.max_pixels is not None:
            require(self.min_pixels <= self.max_pixels, "model.min_pixels", self.min_pixels, "<= model.max_pixels")


@dataclass
class DataSection:
    """Where the preference data comes from and how pairs are built."""

    source: str = "vlfeedback"
    path: str = ""
    images: str | None = None
    split: str = "train"
    aspect_weights: dict[str, float] | None = None
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None
    cap_strategy: str = "margin"
    max_prompts: int | None = None
    eval_fraction: float = 0.0
    eval_size: int | None = None
    truncation: str = "drop"
    num_proc: int = 1
    cache_dir: str | None = None
    seed: int = 0

    def check(self) -> None:
        choice("data.source", self.source, ("vlfeedback", "hf", "preference"))
        require(bool(self.path), "data.path", self.path, "the data file, folder or dataset id")
        choice("data.cap_strategy", self.cap_strategy, ("margin", "random"))
        choice("data.truncation", self.truncation, ("drop", "answer"))
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a number in [0, 1)")
        require(self.min_margin >= 0, "data.min_margin", self.min_margin, "a number >= 0")
        require(self.num_proc >= 1, "data.num_proc", self.num_proc, "an integer >= 1")
        for name, value in (
            ("max_pairs_per_prompt", self.max_pairs_per_prompt),
            ("max_prompts", self.max_prompts),
            ("eval_size", self.eval_size),
        ):
            require(value is None or value >= 1, f"data.{name}", value, "null or an integer >= 1")


@dataclass
class LoraSection:
    """LoRA adapters through peft (Silkie defaults); `enabled: false` means full fine-tuning."""

    enabled: bool = True
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # null: the family's default (all LLM linears / Qwen-VL's four)
    vision: bool = False
    load_in_4bit: bool = False

    def check(self) -> None:
        require(self.r >= 1, "lora.r", self.r, "an integer >= 1")
        require(self.alpha >= 1, "lora.alpha", self.alpha, "an integer >= 1 (the scale is alpha / r)")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a number in [0, 1)")
        require(
            self.target_modules is None or bool(self.target_modules),
            "lora.target_modules",
            self.target_modules,
            "null (the family's default) or a non-empty list",
        )
        for name in self.target_modules or []:
            require(bool(name.strip()), "lora.target_modules", self.target_modules, "module names, none empty")


@dataclass
class DPOSection:
    """DPO knobs with TRL's names, plus the efficient-step switches."""

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    use_weighting: bool = False
    disable_dropout: bool = True
    max_length: int = 2048
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    image_once: bool = True
    share_prompt: bool = True
    chunked_logps: bool = True
    logps_chunk_size: int = 1024

    def check(self) -> None:
        require(self.beta > 0, "dpo.beta", self.beta, "a number > 0")
        problem = objective_problem(
            self.loss_type,
            self.loss_weights,
            self.label_smoothing,
            self.f_divergence_type,
            self.discopop_tau,
            self.use_weighting,
        )
        if problem is not None and problem.choices:
            choice(f"dpo.{problem.key}", problem.value, problem.choices)
        elif problem is not None:
            require(False, f"dpo.{problem.key}", problem.value, problem.allowed)
        if self.ld_alpha is not None:
            require(0.0 <= self.ld_alpha <= 1.0, "dpo.ld_alpha", self.ld_alpha, "null or a number in [0, 1]")
        require(self.max_length >= 16, "dpo.max_length", self.max_length, "an integer >= 16")
        require(self.logps_chunk_size >= 1, "dpo.logps_chunk_size", self.logps_chunk_size, "an integer >= 1")
        size = self.precompute_ref_batch_size
        require(size is None or size >= 1, "dpo.precompute_ref_batch_size", size, "null or an integer >= 1")


@dataclass
class DeepSpeedSection:
    """ZeRO through the Hugging Face integration: `stage` 0 (off), 2 or 3, or a JSON `config` path."""

    stage: int = 0
    offload: bool = False
    config: str | None = None

    def check(self) -> None:
        choice("deepspeed.stage", self.stage, (0, 1, 2, 3))
        require(not (self.offload and self.stage == 0), "deepspeed.offload", self.offload, "false when stage is 0")


@dataclass
class LaunchSection:
    """Local launch: processes per node; `cpu: true` runs N gloo processes without GPUs."""

    nproc_per_node: int | None = None
    cpu: bool = False
    master_port: int = 29500

    def check(self) -> None:
        require(1 <= self.master_port <= 65535, "launch.master_port", self.master_port, "a port in [1, 65535]")
        require(
            self.nproc_per_node is None or self.nproc_per_node >= 1,
            "launch.nproc_per_node",
            self.nproc_per_node,
            "null (one per GPU) or an integer >= 1",
        )


@dataclass
class SlurmSection:
    """Slurm batch settings used with `--gpus N`."""

    gpus_per_node: int = 8
    job_name: str = "silkie-dpo"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | int = "24:00:00"  # sbatch --time: "HH:MM:SS", "D-HH:MM", or minutes
    cpus_per_gpu: int | None = 8
    mem_per_gpu: str | None = None
    constraint: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    requeue: bool = True
    signal: str = "USR1"
    signal_seconds: int = 300
    rdzv_port: int | None = None

    def check(self) -> None:
        require(self.gpus_per_node >= 1, "slurm.gpus_per_node", self.gpus_per_node, "an integer >= 1")
        require(self.signal_seconds >= 1, "slurm.signal_seconds", self.signal_seconds, "an integer >= 1")
        require(
            self.cpus_per_gpu is None or self.cpus_per_gpu >= 1,
            "slurm.cpus_per_gpu",
            self.cpus_per_gpu,
            "null or an integer >= 1",
        )
        require(
            self.rdzv_port is None or 1 <= self.rdzv_port <= 65535,
            "slurm.rdzv_port",
            self.rdzv_port,
            "null (20000 + job id mod 20000) or a port in [1, 65535]",
        )
        require(
            self.signal.upper().removeprefix("SIG") in SLURM_SIGNALS,
            "slurm.signal",
            self.signal,
            "one of USR1, USR2 (SIGTERM is what scancel sends, so it cannot mean 'checkpoint and requeue')",
        )
        for name in ("job_name", "partition", "account", "qos", "time", "mem_per_gpu", "constraint", "signal"):
            _one_sbatch_line(f"slurm.{name}", getattr(self, name))
        for index, line in enumerate(self.extra_sbatch):
            _one_sbatch_line(f"slurm.extra_sbatch[{index}]", line)
        require(bool(str(self.job_name).strip()), "slurm.job_name", self.job_name, "a non-empty name")


SLURM_SIGNALS = ("USR1", "USR2")  # SIGTERM is what scancel sends: it must not mean "checkpoint and requeue"


def _one_sbatch_line(key: str, value: object) -> None:
    """A value written into an `#SBATCH` line must stay on it: a newline would start a shell line and end the
    directives (sbatch reads them only up to the first command)."""
    text = "" if value is None else str(value)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    require(bad is None, key, value, f"text without control characters (it goes into an #SBATCH line; found {bad!r})")
