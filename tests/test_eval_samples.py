"""`dpo.generate_during_eval` (TRL's `generate_during_eval`): after each evaluation the policy's and the reference's
greedy answers to the first held-out prompts go to `eval_samples.jsonl` and TensorBoard; the answers are the ones
the saved adapter and the base model give, for the native Qwen-VL and a transformers family."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from silkie.config import load_recipe
from silkie.errors import RecipeError
from silkie.models.generation import stop_token_ids, text_tokenizer
from silkie.run_dir import EVAL_SAMPLES_NAME
from silkie.train import run_training

from .train_fixtures import DEMO_RECIPE, asset_overrides

SAMPLED = ["training.max_steps=4", "training.eval_strategy=steps", "training.eval_steps=2", "data.eval_fraction=0.1",
           "data.max_prompts=64", "training.logging_steps=1", "training.warmup_ratio=0.0",
           "dpo.generate_during_eval=true", "dpo.generate_num_prompts=2", "dpo.generate_max_new_tokens=12"]  # fmt: skip


def answers_of_the_saved_run(recipe, working, records) -> list[tuple[str, str]]:
    """(adapter's answer, base model's answer) to each record's prompt, generated here from the files on disk."""
    from peft import PeftModel

    from silkie.models.loading import load_base_model
    from silkie.train.build import build_trainer

    model = PeftModel.from_pretrained(load_base_model(recipe.model), str(working / "adapter")).eval()
    built = build_trainer(recipe, working.parent / "scoring", bookkeeping=False, policy=model)
    dataset, collate = built.trainer.eval_dataset, built.trainer.eval_data_collator
    tokenizer = text_tokenizer(built.codec)
    index = {prompt_id: i for i, prompt_id in reversed(list(enumerate(dataset["prompt_id"])))}
    pairs = []
    for record in records:
        batch = collate([dataset[index[record["prompt_id"]]]])
        media = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
        if "image_grid_thw" in media:  # transformers' M-RoPE needs the token types the processor gives
            media["mm_token_type_ids"] = (batch["prompt_input_ids"] == model.config.image_token_id).int()
        kwargs = dict(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"], **media,
                      max_new_tokens=12, do_sample=False, eos_token_id=stop_token_ids(tokenizer))  # fmt: skip
        texts = []
        for adapter in (True, False):
            with torch.no_grad(), nullcontext() if adapter else model.disable_adapter():
                out = model.generate(**kwargs)[0, batch["prompt_input_ids"].shape[1] :].tolist()
            end = next((i + 1 for i, t in enumerate(out) if t in kwargs["eos_token_id"]), len(out))
            texts.append(tokenizer.decode(out[:end], skip_special_tokens=True).strip())
        pairs.append(tuple(texts))
    return pairs


@pytest.mark.parametrize("family, loss", [("qwen_vl", "sigmoid"), ("qwen2_vl", "sigmoid"), ("qwen_vl", "simpo")])
def test_each_evaluation_writes_the_policy_s_and_the_reference_s_answers(family, loss, assets, tmp_path):
    overrides = asset_overrides(assets) + SAMPLED + ["training.report_to=tensorboard", f"dpo.loss_type={loss}"]
    recipe_file = DEMO_RECIPE
    if family == "qwen2_vl":
        from silkie.dev.tiny_hf_vlm import build_tiny_qwen2_vl

        overrides.append(f"model.path={build_tiny_qwen2_vl(tmp_path / 'tiny-qwen2-vl')}")
        recipe_file = DEMO_RECIPE.with_name("demo_qwen2_vl.yaml")
    working = tmp_path / "run"
    recipe = load_recipe(recipe_file, overrides)
    run_training(recipe, working)
    records = [json.loads(line) for line in (working / EVAL_SAMPLES_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 2, 4, 4]
    assert records[0]["prompt_id"] != records[1]["prompt_id"]
    assert [r["prompt_id"] for r in records[:2]] == [r["prompt_id"] for r in records[2:]]
    for record in records:
        assert record["images"] and record["chosen"] and record["chosen"] != record["rejected"]
        assert "?" in record["prompt"] and 0 < record["policy_tokens"] <= 12
        picture = f"<img>{record['images'][0]}</img>" if family == "qwen_vl" else "<|vision_start|><|image_pad|>"
        assert picture in record["prompt"] and record["prompt"].startswith("<|im_start|>system")  # the chat layout
        if loss == "simpo":  # reference-free: no reference answers
            assert record["reference"] is None and record["reference_tokens"] == 0
        else:
            assert 0 < record["reference_tokens"] <= 12
    final = records[2:]
    expected = answers_of_the_saved_run(recipe, working, final)
    assert [r["policy"] for r in final] == [policy for policy, _ in expected]
    if loss != "simpo":
        assert any(r["policy"] != r["reference"] for r in final)  # 4 steps at lr 1e-3 moved the answers
        assert [r["reference"] for r in final] == [reference for _, reference in expected]
    assert any(b"eval_samples/1" in path.read_bytes() for path in (working / "tb").rglob("*") if path.is_file())


def test_generation_needs_evaluations_and_its_keys_need_it(assets):
    with pytest.raises(RecipeError, match="dpo.generate_during_eval answers held-out prompts at each evaluation, "
                                          "but this recipe never evaluates"):  # fmt: skip
        load_recipe(DEMO_RECIPE, [*asset_overrides(assets), "dpo.generate_during_eval=true",
                                  "training.eval_strategy=no"])  # fmt: skip
    with pytest.raises(RecipeError, match="dpo.generate_num_prompts = 0 is not allowed; expected an integer >= 1"):
        load_recipe(DEMO_RECIPE, [*asset_overrides(assets), "dpo.generate_during_eval=true",
                                  "dpo.generate_num_prompts=0"])  # fmt: skip
    recipe = load_recipe(DEMO_RECIPE, [*asset_overrides(assets), "dpo.generate_max_new_tokens=64"])
    note = "dpo.generate_max_new_tokens is set, but only dpo.generate_during_eval: true reads it"
    assert recipe.dpo.notes() == [note]
    with pytest.raises(RecipeError, match=r"'training.generate_during_eval' \(did you mean 'dpo.generate_during_eval'"):
        load_recipe(DEMO_RECIPE, [*asset_overrides(assets), "training.generate_during_eval=true"])


def test_a_stop_signal_ends_the_generation_at_the_next_prompt(assets, tmp_path):
    from silkie.train.build import build_trainer
    from silkie.train.eval_samples import EvalSamplesCallback

    built = build_trainer(load_recipe(DEMO_RECIPE, asset_overrides(assets) + SAMPLED), tmp_path / "run")
    samples = next(c for c in built.trainer.callback_handler.callbacks if isinstance(c, EvalSamplesCallback))
    assert [record["step"] for record in samples.answers(7)] == [7, 7]
    built.preemption.requested = True  # as the signal handler sets it
    assert samples.answers(8) == []
