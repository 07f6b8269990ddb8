"""The Silkie repository's flat recipe format: recognised, translated key by key, printed, written as sections."""

from __future__ import annotations

import re

import pytest

from silkie.config import RecipeError, load_recipe, parse_yaml
from silkie.config.recipe import read_recipe_file

from .slurm_cluster import run_launcher

# Written from the key list of the Silkie release's dpo_config/example.yaml and run_dpo.py's dataclasses (not a
# copy of the file): its two `bf16: true` lines included.
FLAT = """\
model_name_or_path: checkpoints/Qwen-VL-Chat
output_dir: null
bf16: true
fix_vit: true
num_train_epochs: 2
per_device_train_batch_size: 1
per_device_eval_batch_size: 3
gradient_accumulation_steps: 16
evaluation_strategy: steps
eval_steps: 250
save_strategy: steps
save_steps: 50
save_total_limit: 4
learning_rate: 2e-5
weight_decay: 0.01
adam_beta2: 0.95
warmup_ratio: 0.2
lr_scheduler_type: linear
logging_steps: 5
report_to: tensorboard
run_name: my-silkie
model_max_length: 1024
gradient_checkpointing: true
use_lora: true
q_lora: false
lora_r: 32
lora_alpha: 8
lora_dropout: 0.1
lora_target_modules: [c_attn, w1]
beta: 0.2
bf16: true
tf32: true
logging_first_step: true
remove_unused_columns: false
"""

EXPECTED = {  # every sectioned key the translation sets, and its value
    "model.path": "checkpoints/Qwen-VL-Chat",
    "model.dtype": "bf16",
    "training.bf16": True,
    "training.num_train_epochs": 2,
    "training.per_device_train_batch_size": 1,
    "training.per_device_eval_batch_size": 3,
    "training.gradient_accumulation_steps": 16,
    "training.eval_strategy": "steps",
    "training.eval_steps": 250,
    "training.save_strategy": "steps",
    "training.save_steps": 50,
    "training.save_total_limit": 4,
    "training.learning_rate": 2e-5,
    "training.weight_decay": 0.01,
    "training.adam_beta2": 0.95,
    "training.warmup_ratio": 0.2,
    "training.lr_scheduler_type": "linear",
    "training.logging_steps": 5,
    "training.report_to": "tensorboard",
    "training.run_name": "my-silkie",
    "training.gradient_checkpointing": True,
    "training.tf32": True,
    "training.logging_first_step": True,
    "dpo.max_length": 1024,
    "dpo.beta": 0.2,
    "lora.enabled": True,
    "lora.load_in_4bit": False,
    "lora.r": 32,
    "lora.alpha": 8,
    "lora.dropout": 0.1,
    "lora.target_modules": ["c_attn", "w1"],
    # fixed in the original's code: the hub's VLFeedback, a 0.5% held-out split (seed 42), ZeRO-2, its Slurm job
    "data.source": "hf",
    "data.path": "MMInstruction/VLFeedback",
    "data.split": "train",
    "data.images": ".",
    "data.eval_fraction": 0.005,
    "data.seed": 42,
    "data.truncation": "answer",
    "deepspeed.stage": 2,
    "slurm.gpus_per_node": 8,
    "slurm.cpus_per_gpu": 4,
    "slurm.mem_per_gpu": "100GB",
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture
def flat_recipe(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(FLAT)
    return path


def test_a_flat_recipe_is_translated_key_by_key(flat_recipe):
    tree, lines = read_recipe_file(flat_recipe)
    assert _flat(tree) == EXPECTED
    assert lines[0] == 'model_name_or_path: "checkpoints/Qwen-VL-Chat" -> model.path'
    assert 'evaluation_strategy: "steps" -> training.eval_strategy' in lines
    assert "bf16: true -> training.bf16, model.dtype: bf16" in lines
    assert "output_dir: null -> (nothing: the run folder is --working)" in lines
    assert '(set in the original\'s code) -> data.path: "MMInstruction/VLFeedback"' in lines
    assert len(lines) == len(parse_yaml(FLAT)) + 11  # every key of the file once, then what the code fixed
    recipe = load_recipe(flat_recipe, ["data.path=data/vlfeedback/vlfeedback_80k.jsonl", "data.source=vlfeedback"])
    assert (recipe.dpo.beta, recipe.lora.r, recipe.training["eval_strategy"]) == (0.2, 32, "steps")
    assert (recipe.data.source, recipe.data.path) == ("vlfeedback", "data/vlfeedback/vlfeedback_80k.jsonl")


def test_keys_the_file_leaves_out_take_the_original_defaults(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("learning_rate: 1e-5\n")
    recipe = load_recipe(path)
    assert recipe.model.path == "Qwen/Qwen-VL-Chat" and not recipe.lora.enabled  # run_dpo.py: use_lora False
    assert recipe.dpo.max_length == 8192 and recipe.training["per_device_train_batch_size"] == 8
    assert (recipe.training["logging_steps"], recipe.training["save_steps"]) == (500, 500)
    assert recipe.training["eval_strategy"] == "no" and not recipe.lora.vision
    _, lines = read_recipe_file(path)
    assert "use_lora: false (the original's default) -> lora.enabled" in lines


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: 1e-5\nlora_bias: all\n", "flat recipe: lora_bias = 'all' is not allowed; expected 'none'"),
        ("output_dir: runs/x\n", "flat recipe: output_dir = 'runs/x' is not allowed; expected None (the run folder"),
        ("learning_rate: 1e-5\nlearnig_rate: 2e-5\n", "flat recipe: unknown keys 'learnig_rate' (did you mean 'lear"),
        # TRL's DPOConfig names: all at once, each with where it goes
        ("beta: 0.1\ndataset_name: x\nrpo_alpha: 1.0\n", "flat recipe: unknown keys 'dataset_name' (did you mean "
         "'data.path'?), 'rpo_alpha' (RPO is dpo.loss_type: [sigmoid, sft] with dpo.loss_weights: [1, ALPHA])"),
        ("bf16: true\nbf16: false\n", "2:1: not valid YAML: key 'bf16' is set twice, to True and then False"),
        ("evaluation_strategy: steps\neval_strategy: epoch\n", "flat recipe: evaluation_strategy and eval_strategy"),
        ("remove_unused_columns: true\n", "flat recipe: remove_unused_columns = True is not allowed; expected False"),
        ("beta: high\n", "recipe: dpo.beta = 'high' has the wrong type; expected float (the flat recipe's beta)"),
        ("model_max_length: 0\n", "recipe: dpo.max_length = 0 is not allowed; expected an integer >= 16 (the flat "
         "recipe's model_max_length)"),
    ],
)
def test_flat_keys_without_a_place_are_refused_by_name(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="^" + re.escape(str(path)) + ":? ?" + re.escape(message)):
        load_recipe(path)


def test_fix_vit_false_trains_the_vision_tower_in_full_fine_tuning_only(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text("use_lora: false\nfix_vit: false\n")
    assert load_recipe(path).lora.vision
    path.write_text("use_lora: true\nfix_vit: false\n")
    assert not load_recipe(path).lora.vision  # as in the original: LoRA targets the LLM only


def test_the_launcher_prints_the_translation_and_writes_it_as_sections(flat_recipe, tmp_path):
    from silkie.launch.workdir import inspect_workdir, prepare_workdir

    working = tmp_path / "run"
    shown = run_launcher(working, "--dry-run", "--gpus", "8", "model.path=/models/qwen", config=flat_recipe)
    assert shown.returncode == 0, shown.stderr
    assert (
        f"[launch] {flat_recipe} is a flat recipe (the Silkie repository's format); as sections (a launch writes them "
        f"to {working}/config.yaml)" in shown.stderr
    )
    assert "[launch]   lora_r: 32 -> lora.r" in shown.stderr
    assert "#SBATCH --mem-per-gpu=100GB" in shown.stdout and not working.exists()
    recipe = load_recipe(flat_recipe)
    plan = inspect_workdir(working, recipe)
    prepare_workdir(plan, recipe)
    written = parse_yaml((working / "config.yaml").read_text())
    assert set(written) == {"model", "data", "lora", "dpo", "training", "deepspeed", "launch", "slurm"}
    assert load_recipe(working / "config.yaml") == recipe


def test_lora_keys_without_use_lora_are_noted_as_full_fine_tuning(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("learning_rate: 1e-5\nlora_r: 8\n")
    assert not load_recipe(path).lora.enabled  # as run_dpo.py: use_lora defaults to false
    _, lines = read_recipe_file(path)
    note = "NOTE: lora_r set without use_lora: full fine-tuning, as the original; add use_lora: true for LoRA"
    assert lines[0] == note
    path.write_text("learning_rate: 1e-5\nlora_r: 8\nuse_lora: true\n")
    assert not read_recipe_file(path)[1][0].startswith("NOTE")
