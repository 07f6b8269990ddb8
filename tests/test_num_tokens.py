"""TRL's `num_tokens`: every token a run trained on, counted as TRL counts them."""

from __future__ import annotations

from .train_fixtures import FAST, asset_overrides, read_metrics, run_in_process


def test_num_tokens_is_every_trained_token_of_the_epoch(assets, tmp_path):
    from silkie.config import load_recipe
    from silkie.data.build import prepare_data
    from silkie.models.loading import load_tokenizer

    from .train_fixtures import DEMO_RECIPE

    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=6", "training.per_device_train_batch_size=4",
                                                  "training.save_steps=100"]  # fmt: skip
    working = tmp_path / "run"
    run_in_process(working, overrides)
    recipe = load_recipe(DEMO_RECIPE, overrides)
    train = prepare_data(recipe.data, load_tokenizer(recipe.model), recipe.dpo.max_length, working / "cache").train
    # prompt + chosen and prompt + rejected, as TRL's attention masks hold them (Qwen-VL: its 256 image slots too)
    expected = sum(2 * p + c + r for p, c, r in zip(train["prompt_length"], train["chosen_length"],
                                                    train["rejected_length"]))  # fmt: skip
    records = [r for r in read_metrics(working) if "loss" in r and "train_runtime" not in r]
    assert len(records) == -(-len(train) // 4) > 1  # one epoch, several steps
    assert records[-1]["num_tokens"] == expected and records[0]["num_tokens"] < expected
