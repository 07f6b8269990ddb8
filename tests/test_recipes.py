"""The recipe schema as documentation: every shipped recipe loads, every key has help text and a reader that
really reads it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing

import pytest

from silkie.config import TRAINING_KEYS, Recipe, load_recipe
from silkie.config.training import TRAINING_HELP, TRAINING_READ_BY

from .conftest import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "dpo_config").glob("*.yaml"))


def _section_fields() -> list[tuple[str, dataclasses.Field]]:
    hints = typing.get_type_hints(Recipe)
    return [
        (section.name, field)
        for section in dataclasses.fields(Recipe)
        if section.name != "training"
        for field in dataclasses.fields(hints[section.name])
    ]


def _reader(name: str):
    module, qualname = name.split(":")
    target = importlib.import_module(f"silkie.{module}")
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.model.path and recipe.data.path  # the two keys every recipe must set
    assert recipe.to_dict()["dpo"]["beta"] > 0


def test_the_paper_recipes_say_what_the_paper_did():
    silkie = load_recipe(REPO_ROOT / "dpo_config" / "silkie.yaml")
    assert (silkie.lora.r, silkie.lora.alpha, silkie.dpo.beta, silkie.deepspeed.stage) == (64, 16, 0.1, 2)
    assert silkie.lora.target_modules == ["c_attn", "attn.c_proj", "w1", "w2"]
    assert silkie.training["learning_rate"] == 1e-5 and silkie.training["num_train_epochs"] == 3
    full = load_recipe(REPO_ROOT / "dpo_config" / "silkie_full_zero3.yaml")
    assert not full.lora.enabled and full.deepspeed.stage == 3


def test_the_mpo_recipe_says_what_internvl3_s_script_did():
    """OpenGVLab's internvl3_8b_mpo.sh: sigmoid 0.8 + bco_pair 0.2 + rpo_alpha 1 (the chosen NLL), every weight
    trained, lr 2e-7, 256 pairs a step, MMPR converted by `silkie internvl-meta`."""
    mpo = load_recipe(REPO_ROOT / "dpo_config" / "mpo_internvl3.yaml")
    assert (mpo.dpo.loss_type, mpo.dpo.loss_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    assert (mpo.model.family, mpo.lora.enabled, mpo.lora.vision, mpo.deepspeed.stage) == ("internvl", False, True, 3)
    assert mpo.training["learning_rate"] == 2e-7 and mpo.training["global_batch_size"] == 256
    assert mpo.data.path == "data/mmpr_pairs.jsonl" and mpo.dpo.beta == 0.1  # `silkie internvl-meta`'s output


@pytest.mark.parametrize(("section", "field"), _section_fields(), ids=lambda f: getattr(f, "name", f))
def test_every_key_has_help_and_a_reader_that_reads_it(section, field):
    assert field.metadata.get("help"), f"{section}.{field.name} has no help text"
    readers = field.metadata.get("read_by", "").split()
    if f"{section}.{field.name}" == "launch.master_port":  # accepted for old recipes; torchrun picks the port
        assert readers == [] and "Kept for recipes that set it" in field.metadata["help"]
        return
    assert readers, f"{section}.{field.name} names no reader"
    for name in readers:
        source = inspect.getsource(_reader(name))
        assert re.search(rf"\b{field.name}\b", source), f"{name} does not mention {field.name}"


def test_every_training_key_has_help_and_its_reader():
    assert set(TRAINING_HELP) == set(TRAINING_KEYS)
    assert "recipe.training" in inspect.getsource(_reader(TRAINING_READ_BY))


def test_the_gpu_session_trains_with_recipes_that_load():
    """scripts/gpu_session.sh runs the paper recipe with overrides on a lent GPU: a recipe error there would cost a
    session's scarce device time, so each of its train_dpo.py commands is loaded here."""
    import shlex

    text = (REPO_ROOT / "scripts" / "gpu_session.sh").read_text().replace("\\\n", " ")
    commands = re.findall(r"train_dpo\.py (\s*--config .*?)(?:2>&1|$)", text, flags=re.M)
    assert len(commands) == 2  # ZeRO-2/3 and the run without DeepSpeed
    for command in commands:
        words = shlex.split(command.replace("$zero", "2"))
        overrides = [w for w in words if re.match(r"(model|data|lora|dpo|training|deepspeed|launch|slurm)\.\w+=", w)]
        recipe = load_recipe(REPO_ROOT / words[words.index("--config") + 1], overrides)
        assert recipe.model.path == "/tmp/qwen-vl-size" and len(overrides) > 10
