"""The recipe's `dpo:` section: TRL's DPO keys, the vision-aware terms, the efficient-step switches (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from silkie.errors import RecipeError

from .checks import changed_from_default, choice, key, require
from .objective import OTHER_LOSSES, loss_types_of, objective_problem, uses_reference


@dataclass
class DPOSection:
    """DPO knobs with TRL's names, plus the efficient-step switches."""

    beta: float = key(
        0.1,
        "DPO temperature: how far the policy may move from the reference (cpo, simpo: the scale of the policy's "
        "log-prob margin; orpo: the weight lambda of its odds-ratio term).",
        "dpo.losses:DPOObjective.from_section",
    )
    loss_type: str | list[str] = key(
        "sigmoid",
        "Preference loss, TRL 1.16's names (`sigmoid`, `hinge`, `ipo`, `exo_pair`, `nca_pair`, `robust`, "
        "`bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`, `sft`, "
        "`sigmoid_norm`), the reference-free `cpo`, `simpo` and `orpo` (no reference pass, and no frozen copy "
        "under full fine-tuning: `cpo` and `simpo` are TRL's CPOTrainer with `cpo_alpha: 0`, whose default 1.0 "
        "is `[cpo, sft]` / `[simpo, sft]`; `orpo` is ORPOTrainer's loss with its NLL over the answer tokens, where "
        "TRL's also counts the prompt's), the vision-aware `mdpo` (DPO + image-conditional + anchor terms) and "
        "`image_conditional`, or a list of them to combine (e.g. `[sigmoid, sft]`: RPO; `[sigmoid, "
        "image_conditional]`).",
        "dpo.losses:DPOObjective.from_section",
    )
    loss_weights: list[float] | None = key(
        None,
        "One weight per entry of a loss_type list; null = equal weights.",
        "dpo.losses:DPOObjective.from_section",
    )
    label_smoothing: float = key(
        0.0,
        "Assumed label noise: cDPO for `sigmoid`, and the `robust`, `exo_pair` (needs > 0), `aot`, `cpo` and "
        "`simpo` losses (refused where no loss type reads it).",
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
    simpo_gamma: float = key(
        0.5,
        "`simpo`: the target reward margin gamma in -log sigmoid(beta (avg log p_c - avg log p_r) - gamma) (TRL's "
        "`simpo_gamma`, default 0.5; SimPO's beta is far above DPO's, 2 and more in the paper).",
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
    router_aux_loss_coef: float | None = key(
        None,
        "Mixture-of-experts models (qwen3_vl_moe, qwen3_5_moe): weight of the routers' load-balancing loss added to "
        "the objective, TRL's `router_aux_loss_coef` (null: the checkpoint's own, 0.001 for Qwen3-VL MoE; 0: none). "
        "Its tokens are TRL's, a shared prompt counted once per answer; logged as `aux_loss`. Refused for a "
        "dense model.",
        "dpo.step:router_aux_loss_coef",
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
        "Compute the reference log-probs once; cached in `<working>/reference_logps` (refused for the "
        "reference-free cpo, simpo and orpo).",
        "train.build:_trainer",
    )
    sync_ref_model: bool = key(
        False,
        "TR-DPO (TRL's `sync_ref_model`): every `ref_model_sync_steps` optimizer steps the reference moves toward "
        "the policy, ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter. Under LoRA (where TRL "
        "refuses it) the reference is a snapshot of the trained tensors, swapped in for the reference pass: the "
        "factors A and B are mixed one by one (exact for alpha 1, close for less); under full fine-tuning the "
        "frozen copy (or `model.ref_model`) is mixed. Saved in each checkpoint; not with "
        "`precompute_ref_log_probs` or the reference-free losses.",
        "train.build:build_trainer",
    )
    ref_model_mixup_alpha: float = key(
        0.6,
        "TR-DPO's alpha: the policy's share in each reference update (1: the reference becomes the policy, the "
        "paper's hard update).",
        "train.build:_reference_sync",
    )
    ref_model_sync_steps: int = key(
        512,
        "TR-DPO's tau: optimizer steps between reference updates.",
        "train.build:_reference_sync",
    )
    generate_during_eval: bool = key(
        False,
        "TRL's `generate_during_eval`: after each evaluation, greedy answers of the policy and of the reference to "
        "the first `generate_num_prompts` held-out prompts (their pictures included), appended to "
        "`<working>/eval_samples.jsonl` and shown in TensorBoard's text tab (no reference answer for cpo, simpo "
        "and orpo, or once a frozen reference copy was released after `precompute_ref_log_probs`).",
        "train.build:build_trainer",
    )
    generate_num_prompts: int = key(
        4,
        "Held-out prompts answered at each evaluation with `generate_during_eval`.",
        "train.build:build_trainer",
    )
    generate_max_new_tokens: int = key(
        128,
        "Longest answer (tokens) generated with `generate_during_eval`.",
        "train.build:build_trainer",
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
    pairs_per_row: int = key(
        1,
        "With `share_prompt`: pairs packed into one row (each sees only its own tokens, positions restart), so "
        "a micro-batch is not padded to its longest pair; 1: a row per pair.",
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

    def notes(self) -> list[str]:
        """Warnings for settings the recipe may take but that are likely a mistake (said once at the start)."""
        types = loss_types_of(self.loss_type)
        notes = []
        if "simpo" not in types and changed_from_default(self, ("simpo_gamma",)):
            notes.append(f"dpo.simpo_gamma = {self.simpo_gamma} is set, but only dpo.loss_type simpo reads it")
        generation = changed_from_default(self, ("generate_num_prompts", "generate_max_new_tokens"))
        if generation and not self.generate_during_eval:
            notes.append(f"dpo.{generation[0]} is set, but only dpo.generate_during_eval: true reads it")
        sync_keys = changed_from_default(self, ("ref_model_mixup_alpha", "ref_model_sync_steps"))
        if sync_keys and not self.sync_ref_model:
            notes.append(f"dpo.{sync_keys[0]} is set, but only dpo.sync_ref_model: true (TR-DPO) reads it")
        if "simpo" in types and self.beta < 1.0:
            notes.append(
                f"dpo.loss_type simpo with dpo.beta = {self.beta}: its margin gamma/beta is "
                f"{self.simpo_gamma / self.beta:g} nats per answer token; SimPO's beta is 2 and more (the paper)"
            )
        return notes

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
        other = problem is not None and isinstance(problem.value, str) and problem.value in OTHER_LOSSES
        if other:  # another library's loss: what to use instead
            raise RecipeError(f"recipe: dpo.loss_type = {problem.value!r}: {OTHER_LOSSES[problem.value]}")
        if problem is not None and problem.choices:
            choice(f"dpo.{problem.key}", problem.value, problem.choices)
        elif problem is not None:
            require(False, f"dpo.{problem.key}", problem.value, problem.allowed)
        if self.ld_alpha is not None:
            require(0.0 <= self.ld_alpha <= 1.0, "dpo.ld_alpha", self.ld_alpha, "null or a number in [0, 1]")
        for name in ("mdpo_conditional_weight", "mdpo_anchor_weight"):
            require(getattr(self, name) >= 0, f"dpo.{name}", getattr(self, name), "a number >= 0")
        coef = self.router_aux_loss_coef
        require(coef is None or 0 <= coef < math.inf, "dpo.router_aux_loss_coef", coef, "null or a finite number >= 0")
        require(self.max_length >= 16, "dpo.max_length", self.max_length, "an integer >= 16")
        require(self.pairs_per_row >= 1, "dpo.pairs_per_row", self.pairs_per_row, "an integer >= 1")
        require(
            self.share_prompt or self.pairs_per_row == 1,
            "dpo.pairs_per_row",
            self.pairs_per_row,
            "1 when dpo.share_prompt is false (pairs are packed after their shared prompt)",
        )
        require(self.logps_chunk_size >= 1, "dpo.logps_chunk_size", self.logps_chunk_size, "an integer >= 1")
        size = self.precompute_ref_batch_size
        require(size is None or size >= 1, "dpo.precompute_ref_batch_size", size, "null or an integer >= 1")
        require(0 <= self.simpo_gamma < math.inf, "dpo.simpo_gamma", self.simpo_gamma, "a finite number >= 0")
        types = set(loss_types_of(self.loss_type))
        if self.ld_alpha is not None and types & {"simpo", "orpo"}:
            raise RecipeError("recipe: dpo.ld_alpha weights summed log-probs; simpo and orpo average them per token, "
                              "so leave dpo.ld_alpha null")  # fmt: skip
        if self.use_weighting and "orpo" in types:
            raise RecipeError("recipe: dpo.use_weighting (WPO) would also scale orpo's batch-level NLL; leave it false")
        alpha = self.ref_model_mixup_alpha
        require(0 < alpha <= 1, "dpo.ref_model_mixup_alpha", alpha, "a number in (0, 1]")
        steps = self.ref_model_sync_steps
        require(steps >= 1, "dpo.ref_model_sync_steps", steps, "an integer >= 1")
        for name in ("generate_num_prompts", "generate_max_new_tokens"):
            require(getattr(self, name) >= 1, f"dpo.{name}", getattr(self, name), "an integer >= 1")
        if self.sync_ref_model and not uses_reference(self.loss_type):
            raise RecipeError(f"recipe: dpo.sync_ref_model: the loss {self.loss_type!r} reads no reference model, so "
                              "there is none to move; leave it false")  # fmt: skip
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise RecipeError("recipe: dpo.sync_ref_model moves the reference during training, so its log-probs "
                              "cannot be computed once; set dpo.precompute_ref_log_probs=false")  # fmt: skip
        if self.precompute_ref_log_probs and not uses_reference(self.loss_type):
            raise RecipeError(
                f"recipe: dpo.precompute_ref_log_probs: the loss {self.loss_type!r} reads no reference model, so there "
                "is nothing to precompute; leave it false"
            )
