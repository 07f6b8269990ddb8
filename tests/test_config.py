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
    from silkie.train.arguments import training_arguments

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

    from silkie.config import TRAINING_CHOICES

    assert TRAINING_CHOICES["lr_scheduler_type"] == tuple(s.value for s in SchedulerType)
    assert TRAINING_CHOICES["eval_strategy"] == tuple(s.value for s in IntervalStrategy)
    assert TRAINING_CHOICES["save_strategy"] == tuple(s.value for s in SaveStrategy)
    assert TRAINING_CHOICES["log_level"] == tuple(trainer_log_levels)
    with pytest.raises(RecipeError, match="training.lr_scheduler_type = 'cosinee' is not allowed; expected one of"):
        load_recipe(DEMO, ["training.lr_scheduler_type=cosinee"])


def test_optim_sampling_and_report_to_choices_are_the_installed_transformers_values():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.training_args import OptimizerNames, TrainingArguments

    from silkie.config import REPORT_TO_CHOICES, TRAINING_CHOICES

    assert TRAINING_CHOICES["optim"] == tuple(name.value for name in OptimizerNames)
    field = TrainingArguments.__dataclass_fields__["train_sampling_strategy"]
    assert TRAINING_CHOICES["train_sampling_strategy"] == tuple(field.metadata["choices"])
    assert REPORT_TO_CHOICES == ("all", "none", *INTEGRATION_TO_CALLBACK)
    with pytest.raises(RecipeError, match=r"training.report_to = 'wandbb' is not allowed; .* \(did you mean 'wandb'"):
        load_recipe(DEMO, ["training.report_to=[tensorboard, wandbb]"])
    assert load_recipe(DEMO, ["training.report_to=[tensorboard, wandb]"]).training["report_to"][1] == "wandb"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.warmup_ratio=0.1", "training.warmup_steps=10"], "training.warmup_ratio and training.warmup_steps"),
        (["training.dataloader_prefetch_factor=2"], "training.dataloader_prefetch_factor needs training.dataloader_"),
        (["training.save_total_limit=-1"], r"training.save_total_limit = -1 is not allowed; expected null or 0 \(keep"),
        (["training.adam_beta2=1.0"], r"training.adam_beta2 = 1.0 is not allowed; expected a number in \[0, 1\)"),
        (["training.seed=-1"], r"training.seed = -1 is not allowed; expected an integer in \[0, 2\*\*32\)"),
        (["training.num_train_epochs=0"], "training.num_train_epochs = 0 is not allowed; expected a number > 0"),
        (
            ["training.gradient_checkpointing_kwargs={every_n_layer: 2}"],
            r"option training.gradient_checkpointing_kwargs"
            r".every_n_layer \(did you mean 'every_n_layers'\?\)",
        ),
        (
            ["training.activation_checkpointing_kwargs={every_n_layers: 0}"],
            "training.activation_checkpointing_kwargs.every_n_layers = 0 is not allowed; expected an integer >= 1",
        ),
        (
            ["training.gradient_checkpointing_kwargs={offload: true}", "training.activation_checkpointing_kwargs={}"],
            "training.gradient_checkpointing_kwargs and training.activation_checkpointing_kwargs are both set",
        ),
        (["lora.target_modules=[c_attn, '']"], "lora.target_modules = \\['c_attn', ''\\] is not allowed; expected"),
        (["lora.target_parameters=[]"], r"lora.target_parameters = \[\] is not allowed; expected null \(none\) or"),
        (["dpo.router_aux_loss_coef=-0.1"], "dpo.router_aux_loss_coef = -0.1 is not allowed; expected null or"),
        (["slurm.rdzv_port=70000"], r"slurm.rdzv_port = 70000 is not allowed; expected null \(20000"),
        (['slurm.extra_sbatch=["--exclusive\\tx"]'], r"slurm.extra_sbatch\[0\] = '--exclusive\\tx' is not allowed"),
    ],
)
def test_values_out_of_range_are_refused_when_the_recipe_is_read(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, overrides)


def test_steps_given_as_a_ratio_or_a_whole_number_pass():
    recipe = load_recipe(DEMO, ["training.save_steps=0.25", "training.logging_steps=3", "training.max_steps=-1"])
    assert (recipe.training["save_steps"], recipe.training["logging_steps"]) == (0.25, 3.0)


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  path: x\ntraining:\n  learning_rate: [1e-5\n  seed: 3\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert str(caught.value) == (
        f"{recipe}:5:7: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence)"
    )


def test_save_total_limit_zero_keeps_every_checkpoint_as_in_transformers(tmp_path):
    from silkie.run_dir import rotate_checkpoints

    assert load_recipe(DEMO, ["training.save_total_limit=0"]).training["save_total_limit"] == 0
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert rotate_checkpoints(tmp_path, 0) == []
    assert [path.name for path in rotate_checkpoints(tmp_path, 1)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize(
    ("override", "meant"),
    [("lora.rank=8", "r"), ("lora.lora_alpha=8", "alpha"), ("lora.lora_target=x", "target_modules"),
     ("model.model_name_or_path=x", "path"), ("dpo.pref_beta=0.2", "beta"), ("dpo.pref_loss=ipo", "loss_type"),
     ("dpo.moe_aux_loss_coef=0.01", "router_aux_loss_coef")],
)  # fmt: skip
def test_names_from_peft_trl_and_llama_factory_point_to_ours(override, meant):
    key = override.split("=")[0]
    with pytest.raises(RecipeError, match=rf"unknown key '{key}' \(did you mean '{meant}'\?\)"):
        load_recipe(DEMO, [override])


@pytest.mark.parametrize(
    ("override", "hint"),
    [("training.beta=0.2", "(did you mean 'dpo.beta'?)"), ("training.loss_type=ipo", "(did you mean 'dpo.loss_type'?)"),
     ("lora.use_peft=true", "(did you mean 'lora.enabled'?)"), ("data.dataset_name=x", "(did you mean 'data.path'?)"),
     ("dpo.rpo_alpha=1", "(RPO is dpo.loss_type: [sigmoid, sft] with dpo.loss_weights: [1, ALPHA])"),
     ("dpo.max_prompt_length=512", "(there is no separate prompt limit: dpo.max_length bounds prompt + answer"),
     ("dpo.padding_free=true", "(padding-free rows are model.attn_implementation: varlen with dpo.pairs_per_row)"),
     ("training.resume_from_checkpoint=x", "(not needed: the same launch command again resumes"),
     ("dpo.loss_type=kto_pair", "dpo.loss_type = 'kto_pair': kto_pair (removed from TRL) is not supported"),
     ("dpo.cpo_alpha=1", "(CPO's NLL term is dpo.loss_type: [cpo, sft] with dpo.loss_weights: [1, ALPHA])"),
     ("training.simpo_gamma=1", "(did you mean 'dpo.simpo_gamma'?)"),
     ("dpo.loss_type=[sigmoid,rpo]", "dpo.loss_type = 'rpo': RPO is loss_type [sigmoid, sft] with loss_weights"),
     ("lora.use_liger_kernel=true", "(did you mean 'model.liger_kernels'?)"),
     ("training.router_aux_loss_coef=0.01", "(did you mean 'dpo.router_aux_loss_coef'?)"),
     ("model.target_parameters=[x]", "(did you mean 'lora.target_parameters'?)")],
)  # fmt: skip
def test_trl_and_llama_factory_settings_in_another_section_or_missing_say_where_to_go(override, hint):
    with pytest.raises(RecipeError) as caught:
        load_recipe(DEMO, [override])
    assert hint in str(caught.value)


def test_model_family_left_out_is_read_from_the_checkpoint(tmp_path):
    folder = tmp_path / "tiny-qwen2-vl"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}')
    assert load_recipe(DEMO, [f"model.path={folder}"]).model.family == "qwen2_vl"
    assert load_recipe(DEMO, [f"model.path={folder}", "model.family=llava"]).model.family == "llava"  # as given
    assert load_recipe(DEMO, [f"model.path={tmp_path / 'elsewhere'}"]).model.family == "qwen_vl"  # no folder here
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    assert load_recipe(DEMO, [f"model.path={folder}"]).model.family == "qwen_vl"  # unknown: the default
    (folder / "config.json").write_text("not json")
    assert load_recipe(DEMO, [f"model.path={folder}"]).model.family == "qwen_vl"  # the checkpoint check names it


def test_a_hashed_split_needs_a_fraction():
    recipe = REPO_ROOT / "dpo_config" / "demo.yaml"
    assert load_recipe(recipe, ["data.eval_split=hashed"]).data.eval_split == "hashed"
    with pytest.raises(RecipeError, match="data.eval_split = 'hashed' holds out the prompts whose hash falls below"):
        load_recipe(recipe, ["data.eval_split=hashed", "data.eval_fraction=0", "data.eval_size=3"])
    with pytest.raises(RecipeError, match="'hashed' splits data.path, but data.eval_path gives the held-out pairs"):
        load_recipe(recipe, ["data.eval_split=hashed", "data.eval_fraction=0", f"data.eval_path={recipe}"])
    with pytest.raises(RecipeError, match=r"data.eval_split = 'hash' is not allowed.*did you mean 'hashed'"):
        load_recipe(recipe, ["data.eval_split=hash"])
