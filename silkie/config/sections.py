"""The recipe's sections about what is trained: model, data, LoRA, DPO (typed dataclasses, help text and reader on
every key, each section with its own value checks; the run's placement is in `cluster`). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import choice, key, require
from .names import FAMILIES, IMAGE_CORRUPTIONS
from .objective import objective_problem


@dataclass
class ModelSection:
    """Which checkpoint to train and how to load it."""

    path: str = key(
        "",
        "Checkpoint folder: `config.json`, weights and tokenizer files (`qwen.tiktoken` or the processor's).",
        "models.loading:local_checkpoint models.qwen_vl.family:QwenVLFamily.load_model",
    )
    family: str = key(
        "qwen_vl",
        "Model family: `qwen_vl` (Qwen-VL-Chat, native), `qwen2_vl`, `qwen2_5_vl`, `llava` (transformers).",
        "models.family:get_family",
    )
    dtype: str = key(
        "auto",
        "Weights/compute dtype: `auto` (bf16 on GPUs that support it, else fp32), `bf16`, `fp16`, `fp32`.",
        "models.loading:load_base_model",
    )
    attn_implementation: str = key(
        "sdpa",
        "Attention kernel: `sdpa` (default), `eager` (reference), `flex_attention` (qwen_vl).",
        "models.qwen_vl.family:QwenVLFamily.load_model",
    )
    min_pixels: int | None = key(
        None,
        "Qwen2-VL families: fewest pixels per image after resizing (null: the processor's setting).",
        "models.hf_vlm.codec:load_processor",
    )
    max_pixels: int | None = key(
        None,
        "Qwen2-VL families: most pixels per image after resizing; bounds image tokens.",
        "models.hf_vlm.codec:load_processor",
    )

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

    source: str = key(
        "vlfeedback",
        "`vlfeedback` (release jsonl), `hf` (a Hub dataset id or saved dataset) or `preference` "
        "(prompt/chosen/rejected rows).",
        "data.build:_load_rows",
    )
    path: str = key(
        "",
        "The jsonl file, dataset id or preference file to read.",
        "data.build:_load_rows",
    )
    images: str | None = key(
        None,
        "Images: the release's `merged_images.zip` or a folder; null when the rows carry no images.",
        "data.build:build_pairs",
    )
    split: str = key(
        "train",
        "Dataset split for `source: hf`.",
        "data.build:_load_rows",
    )
    aspect_weights: dict[str, float] | None = key(
        None,
        "Weights of the annotation aspects in a completion's score; null = all aspects equally.",
        "data.build:build_pairs",
    )
    min_margin: float = key(
        0.0,
        "Smallest score difference for a (chosen, rejected) pair; ties and closer pairs are dropped.",
        "data.build:build_pairs",
    )
    max_pairs_per_prompt: int | None = key(
        None,
        "At most this many pairs per prompt; null = all pairs.",
        "data.build:build_pairs",
    )
    cap_strategy: str = key(
        "margin",
        "Which pairs the cap keeps: `margin` (largest margins first) or `random`.",
        "data.build:build_pairs",
    )
    max_prompts: int | None = key(
        None,
        "Use only the first N prompts (quick runs); null = all.",
        "data.build:build_pairs",
    )
    eval_fraction: float = key(
        0.0,
        "Fraction of prompts held out for evaluation (split by prompt, so no prompt is in both).",
        "data.build:build_pairs",
    )
    eval_size: int | None = key(
        None,
        "Held-out prompts as a count (instead of a fraction); null = use eval_fraction.",
        "data.build:build_pairs",
    )
    truncation: str = key(
        "drop",
        "Pairs longer than dpo.max_length: `drop` them, or cut the `answer`s to fit.",
        "data.build:prepare_data",
    )
    num_proc: int = key(
        1,
        "Processes for tokenizing the pairs.",
        "data.build:prepare_data",
    )
    cache_dir: str | None = key(
        None,
        "Where tokenized pairs are cached; null = `<working>/cache`.",
        "train.build:build_trainer",
    )
    seed: int = key(
        0,
        "Seed for pair capping and the held-out split (and of each image's corruption).",
        "data.build:build_pairs",
    )
    image_corruption: str = key(
        "crop",
        "How the vision-aware losses and diagnostics corrupt an image (the same corrupted copy every epoch and on "
        "every rank): `crop` (a random crop keeping 1-20% of its area, resized back, as mDPO), `mask` (80% of its "
        "cells blacked out), `noise` (mostly noise), `blank` (grey).",
        "train.build:_trainer",
    )

    def check(self) -> None:
        choice("data.source", self.source, ("vlfeedback", "hf", "preference"))
        require(bool(self.path), "data.path", self.path, "the data file, folder or dataset id")
        choice("data.cap_strategy", self.cap_strategy, ("margin", "random"))
        choice("data.image_corruption", self.image_corruption, IMAGE_CORRUPTIONS)
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

    enabled: bool = key(
        True,
        "Train LoRA adapters (peft); false = full fine-tuning with a frozen reference copy.",
        "models.loading:make_policy",
    )
    r: int = key(
        64,
        "LoRA rank.",
        "models.loading:apply_lora",
    )
    alpha: int = key(
        16,
        "LoRA scaling numerator (scale = alpha / r).",
        "models.loading:apply_lora",
    )
    dropout: float = key(
        0.05,
        "Dropout on the LoRA branch.",
        "models.loading:apply_lora",
    )
    target_modules: list[str] | None = key(
        None,
        "LLM module names that get adapters (null: the family's default).",
        "models.loading:check_lora_targets",
    )
    vision: bool = key(
        False,
        "Also adapt the vision tower (it stays frozen otherwise).",
        "models.loading:make_policy",
    )
    load_in_4bit: bool = key(
        False,
        "QLoRA: language-model linears in NF4 4 bit (needs bitsandbytes and a CUDA GPU).",
        "models.loading:build_policy",
    )

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

    beta: float = key(
        0.1,
        "DPO temperature: how far the policy may move from the reference.",
        "dpo.losses:DPOObjective.from_section",
    )
    loss_type: str | list[str] = key(
        "sigmoid",
        "Preference loss, TRL 1.16's names (`sigmoid`, `hinge`, `ipo`, `exo_pair`, `nca_pair`, `robust`, "
        "`bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`, `sft`, "
        "`sigmoid_norm`), or a list of them to combine (e.g. `[sigmoid, sft]`: RPO).",
        "dpo.losses:DPOObjective.from_section",
    )
    loss_weights: list[float] | None = key(
        None,
        "One weight per entry of a loss_type list; null = equal weights.",
        "dpo.losses:DPOObjective.from_section",
    )
    label_smoothing: float = key(
        0.0,
        "Assumed label noise: cDPO for `sigmoid`, and the `robust`, `exo_pair` (needs > 0) and `aot` losses.",
        "dpo.losses:DPOObjective.from_section",
    )
    f_divergence_type: str = key(
        "reverse_kl",
        "f-DPO regulariser: `reverse_kl` (DPO), `forward_kl`, `js_divergence`, `alpha_divergence` (for "
        "`sigmoid`, `sigmoid_norm`, `hinge`, `ipo`, `exo_pair`, `robust`, `discopop`, `sft`).",
        "dpo.losses:DPOObjective.from_section",
    )
    f_alpha_divergence_coef: float = key(
        1.0,
        "Alpha of `alpha_divergence` (1.0 = reverse KL).",
        "dpo.losses:DPOObjective.from_section",
    )
    discopop_tau: float = key(
        0.05,
        "Temperature of the `discopop` loss's mixing of logistic and exponential terms.",
        "dpo.losses:DPOObjective.from_section",
    )
    mdpo_conditional_weight: float = key(
        1.0,
        "`mdpo`: weight of the image-conditional term (the chosen answer with the image preferred over it with "
        "the corrupted image; the paper: 1).",
        "dpo.losses:DPOObjective.from_section",
    )
    mdpo_anchor_weight: float = key(
        1.0,
        "`mdpo`: weight of the anchor term that keeps the chosen reward above `mdpo_anchor_delta` (the paper: 1).",
        "dpo.losses:DPOObjective.from_section",
    )
    mdpo_anchor_delta: float = key(
        0.0,
        "`mdpo`: the anchor's margin delta in -log sigmoid(beta (pi_c - ref_c) - delta) (the paper: 0).",
        "dpo.losses:DPOObjective.from_section",
    )
    image_diagnostics: bool = key(
        True,
        "Also score the held-out pairs under the corrupted image: `rewards/imageless_accuracies` (chosen still "
        "beats rejected without the picture: the preference is learned from text) and `logps/chosen_image_gain`.",
        "train.trainer:SilkieDPOTrainer.__init__ train.build:_trainer",
    )
    ld_alpha: float | None = key(
        None,
        "LD-DPO (length desensitization): in each pair, the tokens past the shorter answer's length count "
        "`ld_alpha` times in the policy's and the reference's log-probs (0-1; null = plain sums).",
        "dpo.step:recipe_step_options",
    )
    use_weighting: bool = key(
        False,
        "WPO: each pair's loss is weighted by exp(mean over tokens of log p - log sum p^2) of chosen times "
        "rejected under the current policy (no gradient through the weight); not with `aot`/`aot_unpaired`. "
        "TRL 1.16 fails on `sft` with it; Silkie weights the `sft` term too.",
        "dpo.step:recipe_step_options",
    )
    disable_dropout: bool = key(
        True,
        "No dropout in the policy, LoRA's included (TRL's default since 0.7; the Silkie paper's code ran that"
        " DPOTrainer, so its `lora_dropout` 0.05 was not applied). `false` applies `lora.dropout`.",
        "train.build:_policy_and_reference",
    )
    max_length: int = key(
        2048,
        "Longest prompt + answer in tokens (image tokens included).",
        "train.build:build_trainer",
    )
    precompute_ref_log_probs: bool = key(
        False,
        "Compute the reference log-probs once; cached in `<working>/reference_logps`.",
        "train.build:_trainer",
    )
    precompute_ref_batch_size: int | None = key(
        None,
        "Pairs per batch in that pass, which needs no gradients (null: `training.per_device_eval_batch_size`).",
        "train.trainer:SilkieDPOTrainer._reference_pass",
    )
    image_once: bool = key(
        True,
        "Encode each image once per pair (chosen and rejected share it) while vision is frozen.",
        "train.trainer:SilkieDPOTrainer.__init__",
    )
    share_prompt: bool = key(
        True,
        "Pack chosen and rejected answers after one copy of the prompt.",
        "dpo.step:recipe_step_options",
    )
    chunked_logps: bool = key(
        True,
        "Answer log-probs from hidden states in chunks, never the full-vocabulary logits; false: the model's "
        "own logits (the plain, TRL-equivalent path, for checks and benchmarks).",
        "dpo.step:recipe_step_options",
    )
    logps_chunk_size: int = key(
        1024,
        "Tokens per chunk when computing log-probs (bounds the logits memory).",
        "dpo.step:recipe_step_options",
    )

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
        for name in ("mdpo_conditional_weight", "mdpo_anchor_weight"):
            require(getattr(self, name) >= 0, f"dpo.{name}", getattr(self, name), "a number >= 0")
        require(self.max_length >= 16, "dpo.max_length", self.max_length, "an integer >= 16")
        require(self.logps_chunk_size >= 1, "dpo.logps_chunk_size", self.logps_chunk_size, "an integer >= 1")
        size = self.precompute_ref_batch_size
        require(size is None or size >= 1, "dpo.precompute_ref_batch_size", size, "null or an integer >= 1")
