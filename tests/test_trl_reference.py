"""TRL is the reference implementation: on the same tiny model, batch and LoRA weights, our DPO loss and
per-sequence log-probs equal those of TRL's `DPOTrainer` (the pinned version) within 1e-5 in fp32."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from silkie.config import DPOSection
from silkie.config.names import MOE_FAMILIES
from silkie.dpo.losses import DPOObjective
from silkie.dpo.objective import adapter_reference, batch_dpo_loss
from silkie.dpo.step import StepOptions, router_aux_loss_coef

from .hf_fixtures import BUILDERS, PAIRS, MemoryImages, family_batch, model_section

pytest.importorskip("trl")

PLAIN = StepOptions(image_once=False, share_prompt=False, chunked_logps=False)
OPTIMIZED = StepOptions(chunk_size=8)


def trl_trainer(folder, family, tmp_path, use_weighting=False):
    """TRL's DPOTrainer over PAIRS (conversational, one image each) with LoRA on the same modules as ours
    (`use_weighting` at construction makes its fused head return what WPO needs)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from silkie.config import LoraSection
    from silkie.models.family import get_family
    from silkie.models.loading import load_base_model, load_tokenizer

    section = model_section(folder, family)
    processor = load_tokenizer(section).processor
    store = MemoryImages()
    rows = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for i, (prompt, chosen, rejected, size) in enumerate(PAIRS):
        rows["images"].append([store.open(f"img{i}")] if size else [])
        rows["prompt"].append([{"role": "user", "content": prompt}])
        rows["chosen"].append([{"role": "assistant", "content": chosen}])
        rows["rejected"].append([{"role": "assistant", "content": rejected}])
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(PAIRS),
        beta=0.1,
        loss_type=["sigmoid"],
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_length=None,
        seed=0,
        use_weighting=use_weighting,
    )
    targets = get_family(family).lora_target_regex(LoraSection(r=8, alpha=16, dropout=0.0))
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=load_base_model(section),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=processor,
        peft_config=peft_config,
    )
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the policy differ from the reference
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return trainer, Dataset.from_dict(rows)


def trl_values(trainer, dataset) -> dict[str, torch.Tensor]:
    """TRL's loss and per-sequence policy / reference log-probs for one batch of every pair."""
    model = trainer.model
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with torch.no_grad():
        loss = trainer.compute_loss(model, inputs)
        logged = {name: values[-1] for name, values in trainer._metrics["train" if model.training else "eval"].items()}
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, inputs)
        kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        per_token = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
    policy = per_token.sum(-1)
    size = len(dataset)
    return {
        "loss": loss,
        "chosen": policy[:size],
        "rejected": policy[size:],
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
        "completion_tokens": inputs["completion_mask"].sum(-1),
        "entropy": torch.tensor(logged["entropy"]),
        "mean_token_accuracy": torch.tensor(logged["mean_token_accuracy"]),
        **({"aux_loss": torch.tensor(logged["aux_loss"])} if "aux_loss" in logged else {}),
    }


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_loss_and_logps_equal_trl_dpo_trainer(family, tmp_path):
    folder = BUILDERS[family](tmp_path / family)
    trainer, dataset = trl_trainer(folder, family, tmp_path)
    expected = trl_values(trainer, dataset)
    model = trainer.model.eval()
    batch, pad = family_batch(folder, family, model)
    answer_tokens = torch.cat([batch["chosen_attention_mask"].sum(-1), batch["rejected_attention_mask"].sum(-1)])
    assert answer_tokens.tolist() == expected["completion_tokens"].tolist()  # same tokens scored
    # a MoE model: TRL adds the routers' load-balancing loss at the checkpoint's weight (0.001), as we do
    balance = router_aux_loss_coef(model, None)
    assert ("aux_loss" in expected) == (balance > 0) == (family in MOE_FAMILIES)
    for options in (dataclasses.replace(PLAIN, router_aux_loss_coef=balance),
                    dataclasses.replace(OPTIMIZED, router_aux_loss_coef=balance)):  # fmt: skip
        captured = {}

        def reference(ref_batch, features, options=options, captured=captured):
            chosen, rejected = adapter_reference(model, options, pad)(ref_batch, features)
            captured.update(ref_chosen=chosen, ref_rejected=rejected)
            return chosen, rejected

        with torch.no_grad():
            loss, metrics = batch_dpo_loss(model, batch, options, DPOObjective(beta=0.1), pad, reference)
        ours = {
            "loss": loss,
            "chosen": metrics["logps/chosen"],
            "rejected": metrics["logps/rejected"],
            **captured,
        }
        # 1e-5 absolute, plus 1e-6 relative for the summed log-probs: at |sum| ~ 40 one fp32 ulp is 3.8e-6, and
        # TRL sums masked full rows while we sum picked tokens, so the two orders differ by a few ulps
        for key, value in ours.items():
            torch.testing.assert_close(
                value,
                expected[key].to(value.dtype),
                atol=1e-5,
                rtol=1e-6,
                msg=lambda m, key=key, options=options: f"{options} {key}: {m}",
            )
        assert (ours["chosen"] - ours["ref_chosen"]).abs().max() > 1e-2  # the adapter matters
        # TRL's entropy (per answer token) and mean_token_accuracy (per chosen token), from our per-pair values
        for name in ("entropy", "mean_token_accuracy"):
            weight = metrics[f"weight:{name}"]
            mean = (metrics[name] * weight).sum() / weight.sum()
            torch.testing.assert_close(mean, expected[name].to(mean.dtype), atol=1e-5, rtol=1e-5, msg=name)
        if balance:  # the shared prompt's tokens count once per answer, as in TRL's rows: the same loss
            torch.testing.assert_close(metrics["aux_loss"][0], expected["aux_loss"], atol=1e-6, rtol=1e-6)
            assert abs(expected["aux_loss"].item() - 1.0) > 1e-3  # not the value of perfectly even routing
        # the per-pair losses behind eval_loss average to TRL's batch loss
        torch.testing.assert_close(metrics["loss"].mean(), expected["loss"].to(loss.dtype), atol=1e-5, rtol=1e-6)


LOSS_CASES = [
    *({"loss_type": [name]} for name in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard")),
    *({"loss_type": [name]} for name in ("apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "aot_unpaired")),
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"loss_type": ["aot"], "label_smoothing": 0.1},
    {"loss_type": ["discopop"], "discopop_tau": 0.5},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},  # RPO / MPO-style mix
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["hinge"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},  # LD-DPO
    {"loss_type": ["sigmoid"], "use_weighting": True},  # WPO
    # (TRL 1.16 fails on sft with use_weighting: it scales an expanded tensor in place)
    {"loss_type": ["ipo", "sigmoid"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.2, "use_weighting": True},
]


@pytest.fixture(scope="module")
def trl_qwen2_vl(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trl_losses")
    folder = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    trainer, dataset = trl_trainer(folder, "qwen2_vl", tmp_path, use_weighting=True)
    return folder, trainer, dataset


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda case: "-".join(f"{v}" for v in case.values()))
def test_every_loss_type_equals_trl(trl_qwen2_vl, case):
    """Each of TRL 1.16's loss types, f-divergences, a weighted mix, LD-DPO and WPO gives TRL's loss on the same
    batch, on the plain and the optimized path."""
    folder, trainer, dataset = trl_qwen2_vl
    section = DPOSection(beta=0.1, **case)
    section.check()
    trainer.loss_types, trainer.loss_weights = list(section.loss_type), section.loss_weights or [1.0]
    trainer.label_smoothing, trainer.args.discopop_tau = section.label_smoothing, section.discopop_tau
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = (
        section.f_divergence_type,
        section.f_alpha_divergence_coef,
    )
    trainer.ld_alpha, trainer.use_weighting = section.ld_alpha, section.use_weighting
    model = trainer.model.eval()
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    batch, pad = family_batch(folder, "qwen2_vl", model)
    with torch.no_grad():
        expected = trainer.compute_loss(model, inputs)
        for path in (PLAIN, OPTIMIZED):
            options = dataclasses.replace(path, ld_alpha=section.ld_alpha, wpo_weights=section.use_weighting)
            objective, reference = DPOObjective.from_section(section), adapter_reference(model, options, pad)
            loss, metrics = batch_dpo_loss(model, batch, options, objective, pad, reference)
            torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")
    assert loss.item() != pytest.approx(math.log(2), abs=1e-3)  # the adapter moved the policy: not a trivial value
    torch.testing.assert_close(metrics["loss"].mean(), loss, atol=1e-6, rtol=1e-6)
