"""The recipe's `lora:` section: LoRA adapters through peft (typed, with help text and reader on every key). Imports
no torch."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import key, require

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


def module_names(text: str) -> list[str]:
    """`lora.target_modules` written as one string: a name (peft's form), comma-separated names (LLaMA-Factory's
    `lora_target: q_proj,v_proj`) or its `all` (every linear layer: `all-linear`)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return [ALL_LINEAR if name == "all" else name for name in names] or [text]


@dataclass
class LoraSection:
    """LoRA adapters through peft (Silkie defaults); `enabled: false` means full fine-tuning."""

    enabled: bool = key(
        True,
        "Train LoRA adapters (peft); false = full fine-tuning with a frozen reference copy (none for the "
        "reference-free cpo, simpo and orpo).",
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
        "LLM module names that get adapters (null: the family's default; `all-linear`: every linear layer of the "
        "language model but its output head; peft's would take the vision tower's too: lora.vision adds those).",
        "models.loading:check_lora_targets",
    )
    target_parameters: list[str] | None = key(
        None,
        "Mixture-of-experts models: language-model parameters that get adapters (peft's `target_parameters`, a "
        "name or its ending), e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] for Qwen3-VL MoE, whose "
        "experts are 3-D weights that target_modules cannot reach (null: none). peft takes them without dropout.",
        "models.loading:check_lora_parameters",
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
    use_dora: bool = key(
        False,
        "DoRA (peft's `use_dora`): each adapted weight's magnitude is trained apart from its LoRA direction.",
        "models.loading:apply_lora",
    )
    use_rslora: bool = key(
        False,
        "rsLoRA (peft's `use_rslora`): scale alpha / sqrt(r) instead of alpha / r, for high ranks.",
        "models.loading:apply_lora",
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
        require(
            self.target_parameters is None or bool(self.target_parameters),
            "lora.target_parameters",
            self.target_parameters,
            "null (none) or a non-empty list of parameter names",
        )
        for name in self.target_parameters or []:
            require(bool(name.strip()), "lora.target_parameters", self.target_parameters, "parameter names, none empty")
        require(
            ALL_LINEAR not in (self.target_modules or []) or len(self.target_modules) == 1,
            "lora.target_modules",
            self.target_modules,
            f"{ALL_LINEAR} alone, or module names",
        )
