"""Recipe values as users write them: YAML 1.2 numbers and booleans, in files and in key=value overrides."""

from __future__ import annotations

import pytest

from silkie.config import RecipeError, load_recipe

from .conftest import REPO_ROOT

DEMO = REPO_ROOT / "dpo_config" / "demo.yaml"


def test_slurm_times_stay_strings_and_numbers_parse_inside_lists_and_dicts():
    recipe = load_recipe(
        DEMO,
        [
            "slurm.time=48:00:00",
            "dpo.loss_type=[sigmoid, sft]",
            "dpo.loss_weights=[1, 1e-1]",
            "training.lr_scheduler_type=cosine_with_min_lr",
            "training.lr_scheduler_kwargs={min_lr: 1e-6}",
            "training.learning_rate=5e-6",
        ],
    )
    assert recipe.slurm.time == "48:00:00"
    assert recipe.dpo.loss_weights == [1.0, 0.1]
    assert recipe.training["lr_scheduler_kwargs"] == {"min_lr": 1e-6}
    assert recipe.training["learning_rate"] == 5e-6
    assert load_recipe(DEMO, ["slurm.time=30:00"]).slurm.time == "30:00"
    assert load_recipe(DEMO, ["slurm.time=60"]).slurm.time == 60  # minutes, as sbatch reads it
    assert load_recipe(DEMO, ["training.max_steps=10_000", "data.seed=010"]).data.seed == 10  # decimal, not octal
    assert load_recipe(DEMO, ["training.eval_strategy=no"]).training["eval_strategy"] == "no"  # not False


def test_a_recipe_file_with_an_unquoted_time_and_an_empty_section(tmp_path):
    text = DEMO.read_text() + "slurm:\n  time: 24:00:00\ndeepspeed:\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(path, ["deepspeed.stage=2"])
    assert recipe.slurm.time == "24:00:00" and recipe.deepspeed.stage == 2
    with pytest.raises(RecipeError, match=r"dpo.beta = 'high' has the wrong type"):
        load_recipe(path, ["dpo.beta=high"])


def test_the_saved_recipe_reads_back_the_same(tmp_path):
    """config.yaml is read again by train_dpo.py and the launcher: strings that look like numbers keep quotes."""
    from silkie.config import save_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(DEMO.read_text() + 'slurm:\n  account: "0815"\n  qos: "1e5"\n  time: 24:00:00\n')
    recipe = load_recipe(path, ["training.lr_scheduler_kwargs={min_lr: 1e-6}"])
    assert (recipe.slurm.account, recipe.slurm.qos) == ("0815", "1e5")
    save_recipe(recipe, tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml").to_dict() == recipe.to_dict()
    import yaml

    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == recipe.to_dict()  # plain PyYAML agrees


def test_qlora_on_the_cpu_is_refused_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match="lora.load_in_4bit = True needs a CUDA GPU .* launch.cpu = True"):
        load_recipe(DEMO, ["lora.load_in_4bit=true"])
    assert load_recipe(DEMO, ["lora.load_in_4bit=true", "launch.cpu=false"]).lora.load_in_4bit


def test_an_empty_loss_type_list_is_refused():
    with pytest.raises(RecipeError, match=r"dpo.loss_type = \[\] is not allowed; expected a loss type or a non-empty"):
        load_recipe(DEMO, ["dpo.loss_type=[]"])


def test_ld_alpha_and_use_weighting_are_checked():
    recipe = load_recipe(DEMO, ["dpo.ld_alpha=0.5", "dpo.use_weighting=true"])
    assert (recipe.dpo.ld_alpha, recipe.dpo.use_weighting) == (0.5, True)
    with pytest.raises(RecipeError, match=r"dpo.ld_alpha = 1.5 is not allowed; expected null or a number in \[0, 1\]"):
        load_recipe(DEMO, ["dpo.ld_alpha=1.5"])
    with pytest.raises(RecipeError, match=r"dpo.use_weighting = True is not allowed; expected false with loss types"):
        load_recipe(DEMO, ["dpo.use_weighting=true", "dpo.loss_type=[sigmoid, aot_unpaired]"])


def test_a_clash_made_by_an_override_names_the_file_and_the_overrides(tmp_path):
    recipe = tmp_path / "wpo.yaml"
    recipe.write_text(DEMO.read_text().replace("dpo:\n", "dpo:\n  use_weighting: true\n", 1))
    assert load_recipe(recipe).dpo.use_weighting  # the file alone is valid
    with pytest.raises(RecipeError, match=rf"^{recipe} with dpo.loss_type=aot: recipe: dpo.use_weighting = True is"):
        load_recipe(recipe, ["dpo.loss_type=aot"])


def test_save_strategy_best_needs_evaluations_and_ranks_by_eval_loss(tmp_path):
    from silkie.train_args import training_arguments

    with pytest.raises(RecipeError, match="training.save_strategy = 'best' needs evaluations"):
        load_recipe(DEMO, ["training.save_strategy=best", "training.eval_strategy=no"])
    best = ["training.save_strategy=best", "data.eval_fraction=0.2"]
    args = training_arguments(load_recipe(DEMO, best), tmp_path, bf16=False)
    assert (args.metric_for_best_model, args.greater_is_better) == ("loss", False)
    chosen = load_recipe(DEMO, [*best, "training.metric_for_best_model=rewards/accuracies"])
    args = training_arguments(chosen, tmp_path, bf16=False)
    assert (args.metric_for_best_model, args.greater_is_better) == ("rewards/accuracies", True)


def test_training_choices_are_the_installed_transformers_values():
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import trainer_log_levels

    from silkie.training_keys import TRAINING_CHOICES

    assert TRAINING_CHOICES["lr_scheduler_type"] == tuple(s.value for s in SchedulerType)
    assert TRAINING_CHOICES["eval_strategy"] == tuple(s.value for s in IntervalStrategy)
    assert TRAINING_CHOICES["save_strategy"] == tuple(s.value for s in SaveStrategy)
    assert TRAINING_CHOICES["log_level"] == tuple(trainer_log_levels)
    with pytest.raises(RecipeError, match="training.lr_scheduler_type = 'cosinee' is not allowed; expected one of"):
        load_recipe(DEMO, ["training.lr_scheduler_type=cosinee"])
